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
from collections.abc import Mapping
from typing import Any

from deepspec.config import Config, load_config
from deepspec.errors import ConfigError
from deepspec.utils import distributed as dist_utils


def local_worker_count(cfg: Config) -> int:
    import torch  # lazy: importing this module (train.py, node_topology) needs no torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus > 0 else cfg.train.num_cpu_workers


def run_worker(config_path: str | None, opts: list[str]) -> Any:
    """Body of one worker: process group from the environment, then the trainer."""
    import torch  # lazy: as in local_worker_count

    # lazy: a launcher of several workers never trains, so it does not import the trainer
    # (the drafts, transformers); only the workers do
    from deepspec.train.trainer import Trainer  # lazy: see above

    cfg = load_config(config_path, opts)
    info = dist_utils.init_distributed()
    if info.device == "cpu" and info.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    try:
        return Trainer(cfg).run()
    finally:
        dist_utils.cleanup()


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


def launch(config_path: str | None, opts: list[str], cfg: Config) -> Any:
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
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or 29500)
    dist_utils.spawn(
        run_worker,
        nproc,
        config_path,
        opts,
        node_rank=node_rank,
        nodes=nodes,
        addr=addr,
        port=port,
        forward_signals=True,
    )
    return None
