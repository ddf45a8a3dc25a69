"""Whether a server could listen on ``HOST:PORT`` now, for the serving scripts' checks
before they start an engine (which would otherwise fail after loading its models).

    python -m deepspec.utils.ports HOST PORT   # exit 0 when free; else 1 and one line:
                                               # "taken <reason>" or "other <reason>"
"""

from __future__ import annotations

import errno
import socket
import sys


def port_problem(host: str, port: int) -> tuple[str, str] | None:
    """None when ``host:port`` can be bound (with ``SO_REUSEADDR``, as the servers bind),
    else ``("taken" | "other", reason)``."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        return ("taken" if exc.errno == errno.EADDRINUSE else "other"), exc.strerror or str(exc)
    return None


if __name__ == "__main__":
    problem = port_problem(sys.argv[1], int(sys.argv[2]))
    if problem:
        print(" ".join(problem))
        sys.exit(1)
