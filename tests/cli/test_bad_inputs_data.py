"""Bad input to the data scripts: generate_train_data.py, download_and_split.py, launch_server.sh.

Each case runs the real script as a subprocess and checks what a user sees: a non-zero exit,
exactly one ``error:`` line naming the problem, no traceback, and no input or earlier output
lost, changed or added to (every file under the case's directory is hashed before and after).
Servers that must be down are ports nothing listens on; a server that must answer is the
loopback fake of tests/fault_server.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from deepspec.utils.distributed import find_free_port
from tests.badinput import assert_one_error, digest_tree, run_cli, unwritable_dir
from tests.conftest import ROOT
from tests.fault_server import FaultServer
from tests.helpers import needs_llamacpp

GENERATE = os.path.join(ROOT, "scripts", "data", "generate_train_data.py")
SPLIT = os.path.join(ROOT, "scripts", "data", "download_and_split.py")
LAUNCH = os.path.join(ROOT, "scripts", "data", "launch_server.sh")


def _prompts(path, n=3):
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = {"id": f"p{i}", "conversations": [{"role": "user", "content": f"prompt {i}"}]}
            fh.write(json.dumps(row) + "\n")
    return str(path)


def _finished_output(path, n=3):
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            convs = [
                {"role": "user", "content": f"prompt {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
            fh.write(
                json.dumps({"id": f"p{i}", "conversations": convs, "regenerated": {"model": "m"}}) + "\n"
            )
    return str(path)


def _dead_address():
    return f"127.0.0.1:{find_free_port()}"  # nothing listens there


def _assert_untouched(before, *paths):
    """The same files as before, byte for byte: nothing lost, changed or created."""
    after = digest_tree(*paths)
    assert after == before, f"files changed: before {sorted(before)}, after {sorted(after)}"


def generate(tmp_path, *args, env=None):
    return run_cli([GENERATE, "--no-progress", *args], env=env, timeout=120)


# ---- generate_train_data.py ------------------------------------------------------------


def test_generate_overwrite_with_a_dead_server_keeps_the_finished_output(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    out = _finished_output(tmp_path / "out.jsonl")
    (tmp_path / "out_error.jsonl").write_text(json.dumps({"id": "old", "error": "x"}) + "\n")
    before = digest_tree(str(tmp_path))
    addr = _dead_address()
    proc = generate(tmp_path, "--server-address", addr, "--input-file-path", src, "--output-file-path", out,
                    "--overwrite")  # fmt: skip
    assert_one_error(proc, f"cannot reach the server at {addr}", "connection refused", "launch_server.sh")
    _assert_untouched(before, str(tmp_path))


def test_generate_output_equal_to_input_keeps_the_prompts(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    link = tmp_path / "alias.jsonl"
    os.symlink(src, link)  # the same file under another name
    before = digest_tree(str(tmp_path))
    for output in (src, str(link)):
        proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                        "--output-file-path", output, "--overwrite")  # fmt: skip
        assert_one_error(proc, "is the input file", "choose another --output-file-path")
    _assert_untouched(before, str(tmp_path))


def test_generate_error_file_equal_to_input_is_refused(tmp_path):
    src = _prompts(tmp_path / "run_error.jsonl")  # the default error file of run.jsonl
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", str(tmp_path / "run.jsonl"), "--overwrite")  # fmt: skip
    assert_one_error(proc, "the error file", "is the input file")
    _assert_untouched(before, str(tmp_path))


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1:30OOO", "port '30OOO' is not a number from 1 to 65535"),
        ("127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
        ("localhost:", "no port"),
        # urllib raises ValueError on these: one line naming the option, not a traceback
        ("http://[::1", "not a valid URL (Invalid IPv6 URL); close the IPv6 address's bracket"),
        ("[::1:30000", "close the IPv6 address's bracket, e.g. http://[::1]:30000"),
        ("http://[zz]:30000", "not a valid URL"),
        ("127.0.0.1:30000:1", "more than one ':' after the host"),
    ],
)
def test_generate_server_address_typo(tmp_path, address, problem):
    src = _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", address, "--input-file-path", src,
                    "--output-file-path", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert_one_error(proc, f"--server-address {address!r}", problem, "expected HOST:PORT", code=2)
    _assert_untouched(before, str(tmp_path))


def test_generate_duplicate_ids_name_both_lines(tmp_path):
    """Line numbers, not row numbers: the blank line 2 and the malformed line 3 count."""
    src = tmp_path / "in.jsonl"
    rows = [
        json.dumps({"id": i, "conversations": [{"role": "user", "content": "q"}]}) for i in ("a", "b", "a")
    ]
    src.write_text(f"{rows[0]}\n\n{{cut\n{rows[1]}\n{rows[2]}\n")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", str(src),
                    "--output-file-path", str(tmp_path / "out.jsonl"), "--skip-bad-rows")  # fmt: skip
    assert_one_error(proc, str(src), "id 'a' appears twice (lines 1 and 5)", "--resume matches rows by id")
    _assert_untouched(before, str(tmp_path))


def test_generate_cut_input_row_reports_its_real_column(tmp_path):
    src = tmp_path / "in.jsonl"
    _prompts(src)
    cut = '{"id": "cut", "conversations": [{"role": "user", "content": "q"},'
    with open(src, "a", encoding="utf-8") as fh:
        fh.write(cut + "\n")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", str(src),
                    "--output-file-path", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert_one_error(proc, f"{src}:4: invalid JSON", f"at column {len(cut) + 1}, the end of the line")
    _assert_untouched(before, str(tmp_path))


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--temperature", "nan", "--temperature must be a finite number >= 0"),
        ("--temperature", "inf", "--temperature must be a finite number >= 0"),
        ("--temperature", "-0.5", "--temperature must be a finite number >= 0"),
        ("--top-p", "1.5", "--top-p must be a finite number > 0 and <= 1"),
        ("--max-tokens", "0", "--max-tokens must be a finite number >= 1"),
        ("--concurrency", "0", "--concurrency must be"),
        ("--max-retries", "-1", "--max-retries must be"),
        ("--timeout", "0", "--timeout must be a finite number > 0"),
        ("--num-samples", "0", "--num-samples must be"),
        ("--retry-backoff", "nan", "--retry-backoff must be"),
        ("--concurrency", "eight", "argument --concurrency: invalid int value"),
    ],
)
def test_generate_numeric_arguments(tmp_path, flag, value, fragment):
    src = _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", str(tmp_path / "out.jsonl"), flag, value)  # fmt: skip
    assert_one_error(proc, fragment, code=2)
    _assert_untouched(before, str(tmp_path))


def test_generate_missing_input_and_directory_input(tmp_path):
    _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    for src, fragment in ((str(tmp_path / "nope.jsonl"), "not found"), (str(tmp_path), "is a directory")):
        proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                        "--output-file-path", str(tmp_path / "out.jsonl"))  # fmt: skip
        assert_one_error(proc, f"--input-file-path {src}", fragment)
    _assert_untouched(before, str(tmp_path))


def test_generate_unwritable_output_directory(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    ro = unwritable_dir(tmp_path)
    before = digest_tree(str(tmp_path))
    out = os.path.join(ro, "sub", "out.jsonl")
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", out)  # fmt: skip
    assert_one_error(
        proc, f"--output-file-path {os.path.dirname(out)}", "cannot write in", "choose a writable"
    )
    assert not os.path.exists(os.path.join(ro, "sub"))
    _assert_untouched(before, str(tmp_path))


def test_generate_output_under_a_file(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", os.path.join(src, "out.jsonl"))  # fmt: skip
    assert_one_error(proc, "is a file, not a directory")
    _assert_untouched(before, str(tmp_path))


def test_generate_malformed_input_row(tmp_path):
    src = tmp_path / "in.jsonl"
    _prompts(src)
    with open(src, "a", encoding="utf-8") as fh:
        fh.write('{"id": "cut", "conversations": [{"role": "user"\n')
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", str(src),
                    "--output-file-path", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert_one_error(proc, f"{src}:4:", "invalid JSON")
    _assert_untouched(before, str(tmp_path))


def test_generate_existing_output_without_resume_or_overwrite(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    out = _finished_output(tmp_path / "out.jsonl")
    before = digest_tree(str(tmp_path))
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", out)  # fmt: skip
    assert_one_error(proc, f"{out} exists", "--resume", "--overwrite")
    _assert_untouched(before, str(tmp_path))


def test_generate_resume_into_a_foreign_file(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    out = tmp_path / "notes.jsonl"
    out.write_text('{"note": "not a generated row"}\n{"id": "half')  # also a cut last line: kept
    before = digest_tree(str(tmp_path))
    with FaultServer(lambda p, a: "ok") as server:
        proc = generate(tmp_path, "--server-address", server.address, "--input-file-path", src,
                        "--output-file-path", str(out), "--resume")  # fmt: skip
        posts = server.request_models
    assert_one_error(proc, f"{out}:1: not a row written by the generator")
    assert not posts
    _assert_untouched(before, str(tmp_path))


def test_generate_api_key_env_not_set(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    env = {"DEEPSPEC_TEST_NO_SUCH_KEY": ""}
    proc = generate(tmp_path, "--server-address", _dead_address(), "--input-file-path", src,
                    "--output-file-path", str(tmp_path / "out.jsonl"), "--api-key-env",
                    "DEEPSPEC_TEST_NO_SUCH_KEY", env=env)  # fmt: skip
    assert_one_error(proc, "--api-key-env DEEPSPEC_TEST_NO_SUCH_KEY", "not set or empty")
    _assert_untouched(before, str(tmp_path))


def test_generate_model_other_than_the_server_serves(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    out = _finished_output(tmp_path / "out.jsonl")
    before = digest_tree(str(tmp_path))
    with FaultServer(lambda p, a: "ok", model="/models/Target-A.gguf") as server:
        proc = generate(tmp_path, "--server-address", server.address, "--model", "Target-B",
                        "--input-file-path", src, "--output-file-path", out, "--overwrite")  # fmt: skip
        posts = server.request_models
    assert_one_error(proc, "serves 'Target-A.gguf', not --model 'Target-B'")
    assert not posts
    _assert_untouched(before, str(tmp_path))


# ---- download_and_split.py -------------------------------------------------------------


def split(*args):
    return run_cli([SPLIT, *args], timeout=120)


def test_split_output_equal_to_input_keeps_the_input(tmp_path):
    src = _prompts(tmp_path / "train.jsonl")  # --output-dir tmp_path writes tmp_path/train.jsonl
    before = digest_tree(str(tmp_path))
    proc = split("--input", src, "--output-dir", str(tmp_path), "--overwrite")
    assert_one_error(proc, "is the input", "choose another --output-dir")
    ev = tmp_path / "ev"
    ev.mkdir()
    shutil.copy(src, ev / "heldout.jsonl")
    before = digest_tree(str(tmp_path))
    proc = split("--input", str(ev / "heldout.jsonl"), "--name", "heldout", "--test-size", "1",
                 "--output-dir", str(tmp_path / "o"), "--eval-dir", str(ev), "--overwrite")  # fmt: skip
    assert_one_error(proc, "is the input", "choose another --eval-dir")
    _assert_untouched(before, str(tmp_path))


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--test-size", "nan", "--test-size must be a finite number >= 0"),
        ("--test-size", "-1", "--test-size must be a finite number >= 0"),
        ("--test-size", "2.5", "a fraction below 1 or a whole count"),
        ("--max-rows", "0", "--max-rows must be a finite number >= 1"),
        ("--seed", "x", "argument --seed: invalid int value"),
    ],
)
def test_split_numeric_arguments(tmp_path, flag, value, fragment):
    src = _prompts(tmp_path / "in.jsonl")
    before = digest_tree(str(tmp_path))
    proc = split("--input", src, "--output-dir", str(tmp_path / "o"), flag, value)
    assert_one_error(proc, fragment, code=2)
    _assert_untouched(before, str(tmp_path))


def test_split_malformed_line_and_missing_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n{"prompt": \n')
    before = digest_tree(str(tmp_path))
    proc = split("--input", str(src), "--output-dir", str(tmp_path / "o"))
    assert_one_error(proc, f"{src}:2: not a JSON row", "--skip-bad-rows")
    proc = split("--input", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o"))
    assert_one_error(proc, "nope.jsonl not found", "--input")
    _assert_untouched(before, str(tmp_path))


def test_split_cut_line_reports_its_real_column(tmp_path):
    src = tmp_path / "in.jsonl"
    cut = '{"prompt": "cut", "id":'
    src.write_text('{"prompt": "fine"}\n' + cut + "\n")
    before = digest_tree(str(tmp_path))
    proc = split("--input", str(src), "--output-dir", str(tmp_path / "o"))
    assert_one_error(proc, f"{src}:2: not a JSON row", f"at column {len(cut) + 1}, the end of the line",
                     "--skip-bad-rows")  # fmt: skip
    _assert_untouched(before, str(tmp_path))


def test_split_existing_output_and_unwritable_directory(tmp_path):
    src = _prompts(tmp_path / "in.jsonl")
    out = tmp_path / "o"
    out.mkdir()
    (out / "train.jsonl").write_text("earlier output\n")
    ro = unwritable_dir(tmp_path)
    before = digest_tree(str(tmp_path))
    proc = split("--input", src, "--output-dir", str(out))
    assert_one_error(proc, "train.jsonl exists", "--overwrite")
    proc = split("--input", src, "--output-dir", str(out), "--test-size", "1", "--eval-dir",
                 os.path.join(ro, "ev"), "--overwrite")  # fmt: skip
    assert_one_error(proc, "--eval-dir", "cannot write in", "choose a writable directory")
    _assert_untouched(before, str(tmp_path))


# ---- launch_server.sh ------------------------------------------------------------------


def launch(*args):
    return run_cli(["bash", LAUNCH, *args], timeout=120)


def test_launch_port_taken_by_another_server(tmp_path):
    """Another server answering /v1/models on the port must not pass for our worker."""
    logs = tmp_path / "logs"
    with FaultServer(lambda p, a: "ok") as other:
        port = other.address.rsplit(":", 1)[1]
        proc = launch("--engine", "llamacpp", "--base-port", port, "--log-dir", str(logs), "--wait", "20")
    assert_one_error(
        proc, f"port {port} on 127.0.0.1 is already in use", "choose another --base-port", code=1
    )
    assert "ready" not in proc.stdout and not logs.exists()


def test_launch_second_port_taken(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        proc = launch("--num-workers", "2", "--base-port", str(taken - 1), "--log-dir", str(tmp_path / "l"))
    assert_one_error(proc, f"port {taken} on 127.0.0.1 is already in use")
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--base-port", "30OOO"], "--base-port must be an integer from 1 to 65535, got '30OOO'"),
        (["--base-port", "99999"], "--base-port must be an integer from 1 to 65535"),
        (["--num-workers", "0"], "--num-workers must be an integer from 1 to 1024"),
        (["--base-port", "65535", "--num-workers", "2"], "past 65535"),
        (["--threads", "-2"], "--threads must be an integer"),
        (["--wait", "soon"], "--wait must be an integer"),
        (["--engine"], "--engine needs a value"),
        (["--engine", "tgi"], "unknown --engine 'tgi'"),
        (["--engine", "vllm"], "--engine vllm needs --model"),
        (["--engine", "llama-server", "--slots", "0"], "--slots must be an integer from 1 to 4096"),
        (["--engine", "llama-server", "--model", "embedded:x"], "unknown embedded model 'embedded:x'"),
        (["--bogus"], "unknown option '--bogus'"),
    ],
)
def test_launch_bad_arguments(tmp_path, args, fragment):
    proc = launch(*args, "--log-dir", str(tmp_path / "logs")) if args != ["--engine"] else launch(*args)
    assert_one_error(proc, fragment, code=2)
    assert not (tmp_path / "logs").exists()


def test_launch_llama_server_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "nowhere" / "llama-server"))
    proc = launch(
        "--engine", "llama-server", "--base-port", str(find_free_port()), "--log-dir", str(tmp_path / "l")
    )
    assert_one_error(proc, "llama-server is not built", "bash scripts/setup.sh --llama-server", code=1)
    assert not (tmp_path / "l").exists()


@needs_llamacpp
def test_launch_worker_that_dies_is_not_ready(tmp_path):
    """A GGUF that is not one: the worker exits; one error line (the log's tail is indented)."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    before = digest_tree(str(bad))
    logs = tmp_path / "logs"
    proc = launch("--engine", "llamacpp", "--model", str(bad), "--base-port", str(find_free_port()),
                  "--log-dir", str(logs), "--wait", "60", "--threads", "1")  # fmt: skip
    assert_one_error(proc, "worker 0 (port", "exited", code=1)
    assert "ready" not in proc.stdout
    assert not (logs / "pids").exists()  # the failed launch cleaned up after itself
    _assert_untouched(before, str(bad))


def serve_llamacpp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"{ROOT}/scripts/serve/llamacpp.sh", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "--draft is required"),
        (["--draft", "none", "--bogus"], "unknown option --bogus"),
        (["--draft", "none", "--spec-type", "draft-medusa"], "--spec-type must be draft-dspark"),
        (["--draft", "none", "--n-max", "0"], "--n-max must be a positive integer, not '0'"),
        (["--draft", "none", "--port", "80a"], "--port must be a positive integer"),
    ],
)
def test_serve_llamacpp_bad_arguments(args, fragment):
    assert_one_error(serve_llamacpp(*args), fragment, code=2)


def test_serve_llamacpp_missing_files(tmp_path):
    proc = serve_llamacpp("--draft", "none", env={"LLAMA_SERVER_BIN": str(tmp_path / "nowhere")})
    assert_one_error(proc, "llama-server is not built", "bash scripts/setup.sh --llama-server", code=2)
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho should-not-run\n")
    fake.chmod(0o755)
    proc = serve_llamacpp("--draft", str(tmp_path / "d.gguf"), "--target", str(tmp_path / "t.gguf"),
                          env={"LLAMA_SERVER_BIN": str(fake)})  # fmt: skip
    assert_one_error(proc, "target GGUF", "does not exist", code=2)
    (tmp_path / "t.gguf").write_text("x")
    proc = serve_llamacpp("--draft", str(tmp_path / "d.gguf"), "--target", str(tmp_path / "t.gguf"),
                          env={"LLAMA_SERVER_BIN": str(fake)})  # fmt: skip
    assert_one_error(proc, "draft GGUF", "python -m deepspec.export --to llamacpp", code=2)
