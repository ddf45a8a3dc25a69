"""Start training workers: one per visible GPU, or ``train.num_cpu_workers`` gloo workers.

Environment, as ``scripts/train/train.sh`` documents:

* under ``torchrun`` (``LOCAL_RANK`` set) the process is already a worker;
* otherwise this *node*'s rank and the node count come from ``NODE_RANK`` / ``NNODES``
  (torchrun's names) when set, else from ``RANK`` / ``WORLD_SIZE`` as the DeepSpec reference's
  ``train.sh`` uses them (default 0 / 1); ``MASTER_ADDR`` / ``MASTER_PORT`` are the rendezvous.
  The launcher spawns the node's local workers with global ranks ``node_rank * nproc + i``.

SIGTERM or Ctrl-C to the launcher is forwarded to the workers, which save a checkpoint and
stop; the job then exits with code 75 (:class:`deepspec.errors.Preempted`). A user error in
the workers is printed once, by the launcher, as one ``error: [rank r] ...`` line.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from deepspec.config import load_config
from deepspec.errors import ConfigError, Preempted, as_user_error
from deepspec.utils import distributed as dist_utils


def local_worker_count(cfg: Any) -> int:
    import torch  # lazy: importing this module (train.py, node_topology) needs no torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus > 0 else cfg.train.num_cpu_workers


def run_worker(config_path: str | None, opts: list[str]) -> Any:
    """Body of one worker: process group from the environment, then the trainer."""
    import torch  # lazy: as in local_worker_count

    # lazy: a launcher of several workers never trains, so it does not import the trainer
    # (the drafts, transformers); only the workers do
    from deepspec.train.trainer import Trainer

    cfg = load_config(config_path, opts)
    info = dist_utils.init_distributed()
    if info.device == "cpu" and info.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    try:
        return Trainer(cfg).run()
    finally:
        dist_utils.cleanup()


def _spawned(
    local_rank: int,
    config_path,
    opts,
    nproc: int,
    node_rank: int,
    nodes: int,
    addr: str,
    port: int,
    errdir: str,
):
    dist_utils._die_with_parent()
    os.environ.update(
        RANK=str(node_rank * nproc + local_rank),
        WORLD_SIZE=str(nodes * nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    if nodes == 1:  # nothing to meet over the network: a file store, sockets on loopback
        os.environ.update(dist_utils.local_rendezvous_env(os.path.join(errdir, "store")))
    try:
        run_worker(config_path, opts)
    except dist_utils.PeerError as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, quietly (the launcher says so)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs keep their trace
        user = as_user_error(exc)
        if user is None:
            raise
        sys.exit(dist_utils.record_worker_error(errdir, int(os.environ["RANK"]), user))


_GRACE_S = 10  # after one worker stops, the others get this long to stop on their own


def node_topology(env: Mapping[str, str]) -> tuple[int, int]:
    """``(node rank, node count)`` from ``NODE_RANK`` / ``NNODES``, else ``RANK`` / ``WORLD_SIZE``
    (the reference's meaning: node rank and node count, not process rank and count)."""
    values = []
    for names, default in ((("NODE_RANK", "RANK"), "0"), (("NNODES", "WORLD_SIZE"), "1")):
        name = next((n for n in names if env.get(n, "").strip()), None)
        raw = env[name].strip() if name else default
        if not raw.isdigit():
            raise ConfigError(f"{name}={raw!r} must be a whole number (node rank / node count)")
        values.append((name, int(raw)))
    (rank_name, rank), (count_name, count) = values
    if count < 1 or rank >= count:
        raise ConfigError(
            f"node rank {rank} ({rank_name or 'default'}) must be below the node count {count} "
            f"({count_name or 'default'}); set NODE_RANK=0..NNODES-1 (or RANK / WORLD_SIZE) on each node"
        )
    return rank, count


def launch(config_path: str | None, opts: list[str], cfg: Any) -> Any:
    """Run training here (one worker) or spawn this node's workers and wait for them.

    SIGTERM, or a first Ctrl-C, to the launcher is forwarded to the workers as SIGTERM:
    they save a checkpoint and stop, and the launcher raises :class:`Preempted` (exit 75).
    A second Ctrl-C kills the workers at once (the previous checkpoint stays)."""
    if os.environ.get("LOCAL_RANK") is not None:
        return run_worker(config_path, opts)
    nproc = local_worker_count(cfg)
    node_rank, nodes = node_topology(os.environ)
    if nproc * nodes == 1:
        for key in dist_utils.ENV_KEYS:
            os.environ.pop(key, None)
        return run_worker(config_path, opts)
    import torch.multiprocessing as mp  # lazy: as torch in local_worker_count

    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or (dist_utils.find_free_port() if nodes == 1 else 29500))
    with tempfile.TemporaryDirectory(prefix="deepspec-train-") as errdir:
        os.mkdir(os.path.join(errdir, "store"))
        ctx = mp.start_processes(
            _spawned,
            args=(config_path, opts, nproc, node_rank, nodes, addr, port, errdir),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        received: list[int] = []

        def forward(signum, frame):
            received.append(signum)
            if signum == signal.SIGINT:
                if received.count(signal.SIGINT) > 1:  # a second Ctrl-C: abort now
                    for proc in ctx.processes:
                        if proc.is_alive():
                            os.kill(proc.pid, signal.SIGKILL)
                    raise KeyboardInterrupt
            for proc in ctx.processes:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not ctx.join(grace_period=_GRACE_S):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
            recorded = dist_utils.recorded_failure(errdir)
            if recorded is not None:
                raise recorded from None
            if received:  # stopped before the workers could save (still setting up)
                raise Preempted(
                    f"stopped by {signal.Signals(received[0]).name} before a training step finished; "
                    f"nothing new was saved; rerun the same command to resume"
                ) from None
            if isinstance(exc, mp.ProcessRaisedException):
                raise  # a bug in a worker: its traceback is in the message
            raise dist_utils.WorkerFailed(
                f"worker {exc.error_index} of {nproc} exited with code {exc.exit_code}"
                + (" (killed)" if exc.exit_code < 0 else "")
            ) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return None
