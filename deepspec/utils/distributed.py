"""torch.distributed in one place: init from a torchrun-style environment, local spawning.

A worker learns its place from the environment that ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
Without those variables the process is a world of one and no process group is created.

* GPU: one process per GPU (``torchrun --nproc_per_node 8 ...``), backend NCCL, each
  process pinned to ``cuda:LOCAL_RANK``.
* CPU: backend gloo. :func:`spawn` starts N local workers with the same environment
  (``--nproc N`` in the scripts), so a CPU run needs no launcher.

Single-node jobs started here (:func:`spawn`, ``train.py``'s launcher) rendezvous through a
file store in a private temporary directory and keep gloo/NCCL sockets on the loopback
interface (:func:`local_rendezvous_env`): nothing listens on a network interface. Jobs over
several nodes use ``MASTER_ADDR:MASTER_PORT`` (a TCP store, as torchrun does).

Typical use::

    def main_worker(args):
        info = init_distributed()
        try:
            ...
            barrier()
        finally:
            cleanup()

    if args.nproc > 1:
        spawn(main_worker, args.nproc, args)
    else:
        main_worker(args)
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepspec.errors import DeepSpecError, Preempted, as_user_error

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STORE_FILE_ENV = "DEEPSPEC_STORE_FILE"  # set by local launchers: rendezvous through this file


class WorkerFailed(DeepSpecError):
    """A spawned worker exited with an error; ``exit_code`` is the worker's."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerError(DeepSpecError):
    """Raised on the other ranks when one rank found a user error (printed once, by it)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None  # "nccl" | "gloo" | None when no process group exists
    device: str  # "cuda:<local_rank>" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DeepSpecError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_info() -> DistInfo:
    """Rank information of this process (works before and after :func:`init_distributed`)."""
    import torch

    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    backend = None
    if is_initialized():
        import torch.distributed as dist

        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    use_cuda = torch.cuda.is_available() and backend in ("nccl", None)
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def init_distributed(
    backend: str | None = None, *, timeout: datetime.timedelta = datetime.timedelta(minutes=30)
) -> DistInfo:
    """Create the default process group from the environment; no-op for a world of one.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. On NCCL the process is
    pinned to ``cuda:LOCAL_RANK``. Raises :class:`DeepSpecError` when the environment is
    incomplete (e.g. ``WORLD_SIZE`` without ``MASTER_ADDR``).
    """
    import torch
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1 or is_initialized():
        return get_info()
    store_file = os.environ.get(STORE_FILE_ENV)
    needed = ("RANK",) if store_file else ("RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if not os.environ.get(k)]
    if missing:
        raise DeepSpecError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun or --nproc"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        local_rank = _env_int("LOCAL_RANK", 0)
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if store_file:  # a single-node job: no TCP store listening on every interface
        kwargs["store"] = dist.FileStore(store_file, world)
    dist.init_process_group(
        backend=backend,
        rank=_env_int("RANK", 0),
        world_size=world,
        timeout=timeout,
        **kwargs,
    )
    return get_info()


def local_rendezvous_env(private_dir: str) -> dict[str, str]:
    """Environment that keeps a single-node job's rendezvous off the network.

    Workers meet through a file store in ``private_dir`` (a directory only this user can
    read, living as long as the job) instead of a TCP store, which would listen on all
    interfaces; gloo and NCCL open their sockets on the loopback interface unless the user
    chose one (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``)."""
    env = {STORE_FILE_ENV: os.path.join(private_dir, "rendezvous.store"), "MASTER_ADDR": "127.0.0.1"}
    loopback = next((n for n in ("lo", "lo0") if os.path.exists(f"/sys/class/net/{n}")), None)
    if loopback is None and sys.platform == "darwin":
        loopback = "lo0"
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if loopback and not os.environ.get(key):
            env[key] = loopback
    return env


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this process created one."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def _collective_device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float] | list[int]) -> list[float]:
    """Sum a short list of numbers over all ranks (float64; identity without a group)."""
    if not is_initialized():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank; returns it everywhere."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def run_on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on rank 0 only and hand its result to every rank.

    A :class:`DeepSpecError` on rank 0 is re-raised there and raised as :class:`PeerError`
    (same message) on the other ranks, so no rank is left waiting in a collective.
    """
    info = get_info()
    result, error = None, None
    if info.rank == 0:
        try:
            result = fn(*args)
        except DeepSpecError as exc:
            if not info.distributed:
                raise
            error = exc
    if info.distributed:
        result, message = broadcast_object((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise PeerError(message)
    return result


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT or a local server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed launcher leaves no workers."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _spawned_worker(
    local_rank: int, fn: Callable[..., Any], args: tuple[Any, ...], place: dict[str, Any], errdir: str
) -> None:
    """A worker's body: its place in the job in the environment, then ``fn(*args)``; a user
    error is recorded for the launcher (:func:`record_worker_error`), which reports it once."""
    _die_with_parent()
    nproc, node_rank, nodes = place["nproc"], place["node_rank"], place["nodes"]
    os.environ.update(
        RANK=str(node_rank * nproc + local_rank),
        WORLD_SIZE=str(nodes * nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    if nodes == 1:  # nothing to meet over the network: a file store, sockets on loopback
        os.environ.update(local_rendezvous_env(os.path.join(errdir, "store")))
    else:
        os.environ.update(MASTER_ADDR=place["addr"], MASTER_PORT=str(place["port"]))
    try:
        fn(*args)
    except PeerError as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, quietly (the launcher says so)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - user errors are recorded, bugs keep their trace
        user = as_user_error(exc)
        if user is None:
            raise
        sys.exit(record_worker_error(errdir, int(os.environ["RANK"]), user))


def record_worker_error(errdir: str, rank: int, error: DeepSpecError) -> int:
    """Leave a worker's user error for its launcher (which prints one line for the job);
    returns the exit code. Written before the worker exits: a peer blocked in a collective
    only fails once this process is gone, so the launcher finds the root cause here."""
    import json

    record = {
        "rank": rank,
        "code": error.exit_code,
        "preempted": isinstance(error, Preempted),
        "message": " ".join(str(error).split()),
    }
    with open(os.path.join(errdir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return error.exit_code


def recorded_failure(errdir: str) -> DeepSpecError | None:
    """The job's error from its workers' records: the lowest rank's own error, else (every
    recorded worker was preempted) the lowest rank's :class:`Preempted`, else None."""
    import json

    records = []
    for name in sorted(os.listdir(errdir)):
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(errdir, name), encoding="utf-8") as fh:
                    records.append(json.load(fh))
            except (OSError, ValueError):
                continue
    errors = sorted((r for r in records if not r.get("preempted")), key=lambda r: r["rank"])
    if errors:
        return WorkerFailed(
            f"[rank {errors[0]['rank']}] {errors[0]['message']}", exit_code=int(errors[0]["code"])
        )
    if records:
        return Preempted(min(records, key=lambda r: r["rank"])["message"])
    return None


_GRACE_S = 10  # after one worker stops, the others get this long to stop on their own


def spawn(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    node_rank: int = 0,
    nodes: int = 1,
    addr: str = "127.0.0.1",
    port: int = 29500,
    forward_signals: bool = False,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes with a torchrun-style environment: the
    one launcher of training, evaluation and cache workers.

    ``fn`` must be importable (defined at module level). Workers get global ranks
    ``node_rank * nproc + i`` of ``nodes * nproc``; one node rendezvouses through a private
    file store (:func:`local_rendezvous_env`), several through ``addr:port``. A worker's user
    error stops the others and is raised here as :class:`WorkerFailed` (``[rank r] message``,
    the worker's exit code): one line for the job. With ``forward_signals`` SIGTERM or a first
    Ctrl-C is passed on to the workers as SIGTERM (they save and stop; a job stopped before
    any worker reported is :class:`Preempted`), a second Ctrl-C kills them at once. Refuses
    to nest inside an existing multi-process job."""
    import tempfile

    import torch.multiprocessing as mp

    if nproc < 1:
        raise DeepSpecError(f"--nproc must be >= 1, got {nproc}")
    if env_world_size() > 1:
        raise DeepSpecError(
            "--nproc cannot be combined with torchrun (WORLD_SIZE is already set); use one or the other"
        )
    place = {"nproc": nproc, "node_rank": node_rank, "nodes": nodes, "addr": addr, "port": port}
    received: list[int] = []
    with tempfile.TemporaryDirectory(prefix="deepspec-workers-") as errdir:
        os.mkdir(os.path.join(errdir, "store"))
        ctx = mp.start_processes(
            _spawned_worker, args=(fn, args, place, errdir), nprocs=nproc, join=False, start_method="spawn"
        )

        def forward(signum, frame):
            received.append(signum)
            if signum == signal.SIGINT and received.count(signal.SIGINT) > 1:  # a second Ctrl-C
                for proc in ctx.processes:
                    if proc.is_alive():
                        os.kill(proc.pid, signal.SIGKILL)
                raise KeyboardInterrupt
            for proc in ctx.processes:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)

        watched = (signal.SIGTERM, signal.SIGINT) if forward_signals else ()
        previous = {sig: signal.signal(sig, forward) for sig in watched}
        try:
            while not ctx.join(grace_period=_GRACE_S):
                pass
            return
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
            failure, error = recorded_failure(errdir), exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if failure is not None:  # a worker's own error, not a peer's reaction to it
        raise failure
    if received:  # stopped before the workers could report (still setting up)
        raise Preempted(
            f"stopped by {signal.Signals(received[0]).name} before a worker could save or report; "
            "nothing new was saved; rerun the same command to resume"
        )
    if isinstance(error, mp.ProcessExitedException):
        raise WorkerFailed(
            f"worker {error.error_index} of {nproc} exited with code {error.exit_code} "
            f"({'killed' if error.exit_code < 0 else 'see its output above'})"
        )
    print(str(error), file=sys.stderr, flush=True)
    first = str(error).strip().splitlines()
    raise WorkerFailed(
        f"a worker of {nproc} raised: {first[-1] if first else 'unknown error'} (traceback above)"
    )
