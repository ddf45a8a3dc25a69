"""deepspec.utils.distributed on two local gloo ranks (spawned like --nproc 2)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from deepspec.errors import DataError, DeepSpecError
from deepspec.utils import distributed as du


def _collectives(out_dir: str) -> None:
    info = du.init_distributed()
    try:
        total = du.all_reduce_sum([info.rank + 1, 10])
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
            device=info.device, total=total, shared=shared, on_main=on_main, outcome=outcome,
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


def _listening_sockets() -> list[str]:
    """Local addresses (hex ``ip:port`` as in /proc/net) of this process's listening TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    found.append(cols[1])
    return found


def _is_loopback(hex_addr: str) -> bool:
    ip = hex_addr.split(":")[0]
    if len(ip) == 8:  # IPv4, little-endian: 127.x.x.x ends with 7F
        return ip.endswith("7F")
    return ip == "00000000000000000000000001000000" or ip.endswith("0100007F")  # ::1 or ::ffff:127.0.0.1


def _record_listeners(out_dir: str) -> None:
    info = du.init_distributed()
    try:
        du.barrier()  # every socket of the job is open now
        with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as fh:
            json.dump(_listening_sockets(), fh)
        du.barrier()
    finally:
        du.cleanup()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net")
def test_single_node_rendezvous_listens_on_loopback_only(tmp_path):
    du.spawn(_record_listeners, 2, str(tmp_path))
    listeners = [a for r in range(2) for a in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert listeners, "gloo opens listening sockets; none found means the probe is broken"
    assert all(_is_loopback(a) for a in listeners), listeners


def test_the_listener_probe_sees_a_public_socket():
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        public = [a for a in _listening_sockets() if not _is_loopback(a)]
    assert public, "a socket bound to 0.0.0.0 must count as not loopback"


def _oserror_on_rank1() -> None:
    du.init_distributed()
    try:
        if du.get_info().rank == 1:
            open("/nonexistent-dir/deepspec-out.bin", "wb")
        du.barrier()
    finally:
        du.cleanup()


@pytest.mark.slow
def test_an_oserror_in_a_worker_is_one_error_line(capfd):
    with pytest.raises(
        du.WorkerFailed, match=r"\[rank 1\] No such file or directory: /nonexistent-dir/deepspec-out.bin"
    ):
        du.spawn(_oserror_on_rank1, 2)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_collectives_and_error_propagation(tmp_path):
    du.spawn(_collectives, 2, str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert (rec["rank"], rec["world"], rec["local_rank"]) == (rank, 2, rank)
        assert rec["backend"] == "gloo" and rec["device"] == "cpu"
        assert rec["total"] == [3.0, 20.0]
        assert rec["shared"] == {"from": 0, "value": [1, 2]}
        assert rec["on_main"] == "computed by 0"
    assert records[0]["outcome"] == "DataError: bad data on rank 0"
    assert records[1]["outcome"] == "PeerError: bad data on rank 0"
    assert not du.is_initialized()


@pytest.mark.slow
def test_a_failing_worker_stops_the_job_with_one_error(tmp_path, capfd):
    with pytest.raises(du.WorkerFailed, match=r"^\[rank 1\] rank 1 found a problem$") as info:
        du.spawn(_raise_on_rank1, 2)
    assert info.value.exit_code == 2
    assert "error:" not in capfd.readouterr().err  # the entry point prints the one line


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


def test_node_topology_reads_torchrun_names_and_the_references():
    from deepspec.errors import ConfigError
    from deepspec.train.launch import node_topology

    assert node_topology({}) == (0, 1)
    assert node_topology({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)  # the reference: node rank, nodes
    assert node_topology({"NODE_RANK": "2", "NNODES": "4"}) == (2, 4)  # torchrun's names
    assert node_topology({"NODE_RANK": "0", "NNODES": "2", "RANK": "5", "WORLD_SIZE": "16"}) == (0, 2)
    for env, message in (
        ({"NODE_RANK": "2", "NNODES": "2"}, "node rank 2 .NODE_RANK. must be below the node count 2"),
        ({"NNODES": "two"}, "NNODES='two' must be a whole number"),
        ({"RANK": "-1"}, "RANK='-1' must be a whole number"),
    ):
        with pytest.raises(ConfigError, match=message):
            node_topology(env)
