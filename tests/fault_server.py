"""A loopback OpenAI-style chat server that misbehaves on purpose (fault injection only).

Real answers come from the llama.cpp server in the other tests; this one exists to
produce, on demand, what a real server does only by accident: HTTP 500s, hangs past the
client timeout, bodies that are not JSON, latency that reorders completions.

``FaultServer(plan)`` — ``plan(prompt, attempt)`` returns the action for the
``attempt``-th request (0-based) carrying that last user message: ``"ok"``, ``"500"``,
``"400"``, ``"hang"``, ``"badjson"``, ``"empty"``, ``"drop"`` (close the connection with no
answer, as a server that died mid-run) or ``("ok", delay_seconds)``.

``model`` is the name ``GET /v1/models`` lists; ``answer(prompt, attempt)`` the text of an
``"ok"`` (default: names the attempt, to count retries); ``headers`` records the headers (names in lower case) of every
request (to check what a client sends, e.g. no API key by default).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Plan = Callable[[str, int], Any]


class FaultServer:
    def __init__(
        self,
        plan: Plan,
        *,
        hang_seconds: float = 3.0,
        model: str = "fault-model",
        answer: Callable[[str, int], str] | None = None,
    ) -> None:
        self.plan = plan
        self.answer = answer or (lambda prompt, attempt: f"answer to: {prompt[:40]} (attempt {attempt})")
        self.hang_seconds = hang_seconds
        self.model = model
        self.attempts: Counter = Counter()
        self.headers: list[dict[str, str]] = []
        self.request_models: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with server.lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                body = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "me"}]}
                self._send(200, json.dumps(body).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                prompt = request["messages"][-1]["content"]
                with server.lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.request_models.append(request.get("model"))
                    attempt = server.attempts[prompt]
                    server.attempts[prompt] += 1
                action = server.plan(prompt, attempt)
                delay = 0.0
                if isinstance(action, tuple):
                    action, delay = action
                time.sleep(delay)
                if action == "500":
                    self._send(500, b'{"error": {"message": "injected failure"}}')
                elif action == "400":
                    self._send(400, b'{"error": {"message": "prompt too long"}}')
                elif action == "hang":
                    time.sleep(server.hang_seconds)
                    self._send(200, b"{}")
                elif action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif action == "badjson":
                    self._send(200, b'{"choices": [ this is not json')
                elif action == "empty":
                    self._send(
                        200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
                    )
                else:
                    answer = server.answer(prompt, attempt)
                    body = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": server.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
                    }
                    self._send(200, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # clients that gave up
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
