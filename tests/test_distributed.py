"""deepspec.utils.distributed on two local gloo ranks (spawned like --nproc 2)."""

from __future__ import annotations

import json
import os

import pytest

from deepspec.errors import DataError, DeepSpecError
from deepspec.utils import distributed as du


def _collectives(out_dir: str) -> None:
    info = du.init_distributed()
    try:
        total = du.all_reduce_sum([info.rank + 1, 10])
        biggest = du.all_reduce_max(float(info.rank * 5))
        shared = du.broadcast_object({"from": info.rank, "value": [1, 2]} if info.rank == 0 else None)
        on_main = du.run_on_main(lambda: f"computed by {du.get_info().rank}")
        try:
            du.run_on_main(_fail_on_main)
            outcome = "no error"
        except DeepSpecError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        du.barrier()
        record = dict(
            rank=info.rank, world=info.world_size, local_rank=info.local_rank, backend=info.backend,
            device=info.device, total=total, biggest=biggest, shared=shared, on_main=on_main, outcome=outcome,
        )  # fmt: skip
        with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as fh:
            json.dump(record, fh)
    finally:
        du.cleanup()


def _fail_on_main() -> None:
    raise DataError("bad data on rank 0")


def _raise_on_rank1() -> None:
    du.init_distributed()
    try:
        if du.get_info().rank == 1:
            raise DataError("rank 1 found a problem")
        du.barrier()
    finally:
        du.cleanup()


@pytest.mark.slow
def test_two_gloo_ranks_collectives_and_error_propagation(tmp_path):
    du.spawn(_collectives, 2, str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert (rec["rank"], rec["world"], rec["local_rank"]) == (rank, 2, rank)
        assert rec["backend"] == "gloo" and rec["device"] == "cpu"
        assert rec["total"] == [3.0, 20.0] and rec["biggest"] == 5.0
        assert rec["shared"] == {"from": 0, "value": [1, 2]}
        assert rec["on_main"] == "computed by 0"
    assert records[0]["outcome"] == "DataError: bad data on rank 0"
    assert records[1]["outcome"] == "PeerError: bad data on rank 0"
    assert not du.is_initialized()


@pytest.mark.slow
def test_a_failing_worker_stops_the_job_with_one_error(tmp_path, capfd):
    with pytest.raises(du.WorkerFailed, match="worker 1 of 2 exited with code 2"):
        du.spawn(_raise_on_rank1, 2)
    err = capfd.readouterr().err
    assert "error: [rank 1] rank 1 found a problem" in err


def test_single_process_without_env_is_a_world_of_one(monkeypatch):
    for key in du.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    info = du.init_distributed()
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert du.all_reduce_sum([2, 3]) == [2.0, 3.0] and du.broadcast_object("x") == "x"
    assert du.run_on_main(lambda: 7) == 7
    with pytest.raises(DataError):
        du.run_on_main(_fail_on_main)


def test_incomplete_env_and_nesting_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DeepSpecError, match="MASTER_ADDR"):
        du.init_distributed()
    with pytest.raises(DeepSpecError, match="cannot be combined with torchrun"):
        du.spawn(_raise_on_rank1, 2)
