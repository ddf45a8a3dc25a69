"""Answer regeneration: a real llama.cpp server, SIGKILL + resume, faults, launch_server.sh.

The llama.cpp tests start ``python -m llama_cpp.server`` on 127.0.0.1 with the embedded
SmolLM2 GGUF and stop it afterwards. The loopback fault server (tests/fault_server.py) is
used only to inject failures a real server does not produce on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest

from deepspec.data import ChatTokenizer, read_conversations
from deepspec.data.generation_backends import OpenAIBackend, SamplingParams
from deepspec.data.regenerate import RegenOptions, count_pending, read_done_ids, run_regeneration
from deepspec.errors import DataError
from deepspec.targets import embedded_bf16_gguf_path, llama_server_bin
from deepspec.utils.distributed import find_free_port
from tests.conftest import ROOT
from tests.fault_server import FaultServer
from tests.helpers import HAVE_LLAMACPP, needs_llamacpp

MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")
GENERATE = os.path.join(ROOT, "scripts", "data", "generate_train_data.py")
LAUNCH = os.path.join(ROOT, "scripts", "data", "launch_server.sh")


def head(path, n, out):
    with open(path, encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(n)]
    out.write_text("".join(lines), encoding="utf-8")
    return out, [json.loads(line)["id"] for line in lines]


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_generate(args, **kw):
    return subprocess.run(
        [sys.executable, GENERATE, "--no-progress", *args], cwd=ROOT, capture_output=True, text=True, **kw
    )


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_http(url, proc=None, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real llama.cpp server with the embedded SmolLM2 GGUF on a free loopback port."""
    if not HAVE_LLAMACPP:
        pytest.skip("llama-cpp-python is not importable (install it with: bash scripts/setup.sh --llamacpp)")
    from deepspec.targets import embedded_gguf_path

    port = find_free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", embedded_gguf_path("smollm2-135m-instruct"),
                "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--seed", "0",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- the real server ----------------------------------------------------------------------


@needs_llamacpp
@pytest.mark.slow
def test_real_server_regenerates_mini_prompts(llama_server, tmp_path, smollm2_tokenizer):
    from deepspec.targets import embedded_gguf_path

    data, ids = head(MINI, 8, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    proc = run_generate(
        [
            "--server-address", llama_server, "--input-file-path", str(data),
            "--output-file-path", str(out), "--max-tokens", "32", "--concurrency", "4",
            "--temperature", "0",
        ],
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "regeneration: 8 ok, 0 failed" in proc.stdout
    convs = list(read_conversations(out))  # strict reader: every row is a valid conversation
    assert sorted(c.id for c in convs) == sorted(ids)
    originals = {r["id"]: r for r in rows(data)}
    chat = ChatTokenizer(smollm2_tokenizer, max_length=4096, min_loss_tokens=1)
    for conv in convs:
        assert [m["role"] for m in conv.messages] == ["user", "assistant"]
        assert conv.messages[0] == originals[conv.id]["conversations"][0]
        answer = conv.messages[1]["content"]
        reference = originals[conv.id]["conversations"][1:]  # some rows ship no answer
        assert answer.strip() and (not reference or answer != reference[0]["content"])
        meta = conv.extra["regenerated"]
        # llama.cpp lists the GGUF's absolute path; rows carry only its file name
        assert meta["model"] == os.path.basename(embedded_gguf_path("smollm2-135m-instruct"))
        assert 0 < meta["completion_tokens"] <= 32 and meta["finish_reasons"][0] in ("stop", "length")
        assert conv.extra["source"] == originals[conv.id]["source"]  # extra keys survive
        assert chat(conv.messages).num_loss_tokens > 0
    assert not rows(tmp_path / "out_error.jsonl")


@needs_llamacpp
@pytest.mark.slow
def test_real_server_sigkill_then_resume_writes_every_id_once(llama_server, tmp_path):
    data, ids = head(MINI, 8, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = [
        "--server-address", llama_server, "--input-file-path", str(data), "--output-file-path", str(out),
        "--max-tokens", "48", "--concurrency", "2", "--temperature", "0",
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, GENERATE, "--no-progress", *args], cwd=ROOT)
    deadline = time.time() + 240
    while len(rows(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["id"] for r in rows(out)}
    assert 2 <= len(before) < 8, "the kill must land mid-run"
    resumed = run_generate([*args, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} skipped" in resumed.stdout
    written = [r["id"] for r in rows(out)] + [r["id"] for r in rows(tmp_path / "out_error.jsonl")]
    assert Counter(written) == Counter(ids)  # every input id exactly once
    # greedy decoding: the killed + resumed run equals an uninterrupted one, row for row
    clean = tmp_path / "clean.jsonl"
    again = run_generate([a.replace(str(out), str(clean)) for a in args], timeout=300)
    assert again.returncode == 0, again.stderr
    assert _sorted_digest(out) == _sorted_digest(clean)


def test_unreachable_server_at_start_is_one_error_and_writes_nothing(tmp_path):
    data, _ = head(MINI, 8, tmp_path / "in.jsonl")
    out = tmp_path / "sub" / "out.jsonl"
    port = find_free_port()  # nothing listens there
    proc = run_generate(
        [
            "--server-address", f"127.0.0.1:{port}", "--model", "m", "--input-file-path", str(data),
            "--output-file-path", str(out), "--max-retries", "1", "--retry-backoff", "0.01",
        ],
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the server at 127.0.0.1:{port}"), (
        proc.stderr
    )
    assert "Connection refused" in lines[0]
    assert not (tmp_path / "sub").exists()  # no output, no error file, not even the directory


def test_server_dying_mid_run_rows_go_to_error_file(tmp_path):
    """Reachable at the start, then every answer is a dropped connection: per-row retries,
    then the error file (the original rows kept for a later --retry-errors)."""
    ids = _write_prompts(tmp_path / "in.jsonl", 8)
    out = tmp_path / "out.jsonl"
    with FaultServer(lambda prompt, attempt: "drop") as server:
        proc = run_generate(
            [
                "--server-address", server.address, "--input-file-path", str(tmp_path / "in.jsonl"),
                "--output-file-path", str(out), "--max-retries", "1", "--retry-backoff", "0.01",
            ],
            timeout=120,
        )  # fmt: skip
        attempts = dict(server.attempts)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 8 of 8 rows failed"), proc.stderr
    errors = rows(tmp_path / "out_error.jsonl")
    assert sorted(e["id"] for e in errors) == sorted(ids)
    assert all("connection failed" in e["error"] and "after 2 attempts" in e["error"] for e in errors)
    assert all(e["conversations"] for e in errors)  # the original row is kept for a retry
    assert attempts == {f"prompt {i}": 2 for i in range(8)}
    assert not rows(out)


# ---- fault injection (loopback fake server) ---------------------------------------------


def _opts(data, out, **kw):
    base = dict(input_path=str(data), output_path=str(out), progress=False, retry_backoff=0.01)
    base.update(kw)
    return RegenOptions(**base)


def _write_prompts(path, n):
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"id": f"p{i}", "conversations": [{"role": "user", "content": f"prompt {i}"}]})
                + "\n"
            )
    return [f"p{i}" for i in range(n)]


def test_faults_are_retried_and_counts_reconcile(tmp_path):
    ids = _write_prompts(tmp_path / "in.jsonl", 24)

    def plan(prompt, attempt):
        i = int(prompt.split()[1])
        if i == 0:
            return "500"  # always fails: error file after all retries
        if i == 1:
            return "400"  # not retryable: one attempt only
        script = ["500", "badjson", "hang", "empty"]
        return script[attempt] if attempt < i % 5 else ("ok", 0.002 * (i % 7))

    with FaultServer(plan, hang_seconds=4.0) as server:
        backend = OpenAIBackend([server.address], None, timeout=1.5)
        out = tmp_path / "out.jsonl"
        summary = run_regeneration(
            backend, _opts(tmp_path / "in.jsonl", out, max_retries=4, concurrency=8), SamplingParams()
        )
        attempts = dict(server.attempts)
    assert (summary.ok, summary.failed, summary.skipped, summary.total) == (22, 2, 0, 24)
    ok, errors = rows(out), rows(tmp_path / "out_error.jsonl")
    assert Counter([r["id"] for r in ok] + [r["id"] for r in errors]) == Counter(ids)
    by_id = {e["id"]: e["error"] for e in errors}
    assert "HTTP 500" in by_id["p0"] and "after 5 attempts" in by_id["p0"]
    assert "HTTP 400" in by_id["p1"] and "after 1 attempt)" in by_id["p1"]
    assert attempts["prompt 0"] == 5 and attempts["prompt 1"] == 1
    for row in ok:
        i = int(row["id"][1:])
        assert attempts[f"prompt {i}"] == i % 5 + 1  # each injected fault cost exactly one retry
        assert row["conversations"][-1]["content"].endswith(f"(attempt {i % 5})")
    assert summary.requests == sum(attempts.values())
    assert summary.completion_tokens == 7 * 22


def _sorted_digest(path):
    """SHA-256 of a row file's lines in id order (rows are written in completion order)."""
    lines = sorted(open(path, encoding="utf-8").read().splitlines(), key=lambda line: json.loads(line)["id"])
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


def _deterministic_answer(prompt, attempt):
    return f"answer to: {prompt}"  # the same whichever attempt answers (kills retry rows)


def test_sigkill_with_many_rows_in_flight_then_resume(tmp_path):
    ids = _write_prompts(tmp_path / "in.jsonl", 240)
    out = tmp_path / "out.jsonl"

    def plan(prompt, attempt):
        i = int(prompt.split()[1])
        if i % 37 == 5:
            return "400"
        return ("ok", 0.005 + 0.01 * (i * 7919 % 9))  # completions out of input order

    args = [
        "--input-file-path",
        str(tmp_path / "in.jsonl"),
        "--output-file-path",
        str(out),
        "--concurrency",
        "16",
        "--temperature",
        "0",
    ]
    with FaultServer(plan, answer=_deterministic_answer) as server:
        args += ["--server-address", server.address, "--retry-backoff", "0.01"]
        proc = subprocess.Popen([sys.executable, GENERATE, "--no-progress", *args], cwd=ROOT)
        deadline = time.time() + 120
        while len(rows(out)) < 60 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = [r["id"] for r in rows(out)]
        failed_first = rows(tmp_path / "out_error.jsonl")
        assert 60 <= len(first) < 240
        assert first != sorted(first, key=lambda s: int(s[1:]))  # written in completion order
        resumed = run_generate([*args, "--resume"], timeout=120)
        clean_args = [a.replace(str(out), str(tmp_path / "clean.jsonl")) for a in args]
        clean = run_generate(clean_args, timeout=120)  # the same run, never interrupted
    assert resumed.returncode == 1 and clean.returncode == 1  # some rows were answered with HTTP 400
    counts = re.search(r"(\d+) ok, (\d+) failed, (\d+) skipped \(already done\) of 240", resumed.stdout)
    ok, failed, skipped = map(int, counts.groups())
    assert ok + failed + skipped == 240 and skipped == len(first) + len(failed_first)  # counts reconcile
    written = [r["id"] for r in rows(out)] + [r["id"] for r in rows(tmp_path / "out_error.jsonl")]
    assert Counter(written) == Counter(ids)
    assert len(rows(tmp_path / "out_error.jsonl")) == sum(1 for i in range(240) if i % 37 == 5)
    # killed + resumed == uninterrupted, byte for byte once put in id order
    assert _sorted_digest(out) == _sorted_digest(tmp_path / "clean.jsonl")
    assert _sorted_digest(tmp_path / "out_error.jsonl") == _sorted_digest(tmp_path / "clean_error.jsonl")


def test_sigkill_during_overwrite_keeps_the_previous_output(tmp_path):
    """--overwrite writes beside the output; a kill leaves the previous output intact and
    --overwrite --resume finishes the new run, which then replaces it."""
    ids = _write_prompts(tmp_path / "in.jsonl", 120)
    out, err = tmp_path / "out.jsonl", tmp_path / "out_error.jsonl"
    old_rows = "".join(json.dumps({"id": i, "conversations": [], "old": True}) + "\n" for i in ids)
    out.write_text(old_rows)
    err.write_text(json.dumps({"id": "p0", "error": "old"}) + "\n")
    args = [
        "--input-file-path", str(tmp_path / "in.jsonl"), "--output-file-path", str(out),
        "--concurrency", "8", "--overwrite",
    ]  # fmt: skip
    partial = tmp_path / "out.jsonl.partial"
    with FaultServer(lambda p, a: ("ok", 0.02), answer=_deterministic_answer) as server:
        args += ["--server-address", server.address]
        proc = subprocess.Popen([sys.executable, GENERATE, "--no-progress", *args], cwd=ROOT)
        deadline = time.time() + 120
        while len(rows(partial)) < 20 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert out.read_text() == old_rows and rows(err) == [{"id": "p0", "error": "old"}]
        done = len(rows(partial))
        assert 20 <= done < 120
        resumed = run_generate([*args, "--resume"], timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} skipped" in resumed.stdout
    new = rows(out)
    assert Counter(r["id"] for r in new) == Counter(ids) and not any(r.get("old") for r in new)
    assert not err.exists() and not partial.exists()  # the old error file went with the old output
    assert not (tmp_path / "out_error.jsonl.partial").exists()


def test_overwrite_stopped_early_keeps_the_previous_output(tmp_path):
    _write_prompts(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "p0", "conversations": []}) + "\n")
    before = out.read_bytes()
    args = [
        "--input-file-path", str(tmp_path / "in.jsonl"), "--output-file-path", str(out), "--overwrite",
        "--max-consecutive-failures", "2", "--concurrency", "1", "--max-retries", "0",
    ]  # fmt: skip
    with FaultServer(lambda p, a: "400") as server:
        proc = run_generate([*args, "--server-address", server.address], timeout=60)
    assert proc.returncode == 2 and out.read_bytes() == before
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped after 2 rows failed in a row" in lines[0]
    assert f"the previous {out} is unchanged" in lines[0] and "--overwrite --resume" in lines[0]
    assert len(rows(tmp_path / "out_error.jsonl.partial")) == 2


def test_resume_repairs_a_cut_line_and_retry_errors(tmp_path):
    ids = _write_prompts(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    err = tmp_path / "out_error.jsonl"
    out.write_text(json.dumps({"id": "p0", "conversations": []}) + "\n" + '{"id": "p1", "conv')
    err.write_text(json.dumps({"id": "p2", "error": "x"}) + "\n")
    assert read_done_ids(str(out)) == {"p0"}
    before = out.read_bytes()
    assert count_pending(_opts(tmp_path / "in.jsonl", out)) == 4  # p1 (cut), p3, p4, p5
    assert count_pending(_opts(tmp_path / "in.jsonl", out, num_samples=2)) == 12  # ids p<i>#<k>
    assert out.read_bytes() == before  # counting repairs nothing
    with FaultServer(lambda p, a: "ok") as server:
        summary = run_regeneration(
            OpenAIBackend([server.address], None, timeout=5),
            _opts(tmp_path / "in.jsonl", out, resume=True),
            SamplingParams(),
        )
        assert (summary.ok, summary.skipped, summary.failed) == (4, 2, 0)
        assert Counter(r["id"] for r in rows(out)) == Counter(["p0", "p1", "p3", "p4", "p5"])
        summary = run_regeneration(
            OpenAIBackend([server.address], None, timeout=5),
            _opts(tmp_path / "in.jsonl", out, resume=True, retry_errors=True),
            SamplingParams(),
        )
    assert (summary.ok, summary.skipped) == (1, 5)
    assert Counter(r["id"] for r in rows(out)) == Counter(ids) and not rows(err)
    assert count_pending(_opts(tmp_path / "in.jsonl", out)) == 0


def test_refuses_to_clobber_and_duplicate_ids(tmp_path):
    _write_prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "p0"}) + "\n")
    backend = OpenAIBackend(["127.0.0.1:9"], "m", timeout=1)
    with pytest.raises(DataError, match="pass --resume"):
        run_regeneration(backend, _opts(tmp_path / "in.jsonl", out), SamplingParams())
    dup = tmp_path / "dup.jsonl"
    line = json.dumps({"id": "a", "conversations": [{"role": "user", "content": "x"}]})
    dup.write_text(line + "\n" + line + "\n")
    with pytest.raises(DataError, match="appears twice"):
        run_regeneration(backend, _opts(dup, tmp_path / "o2.jsonl"), SamplingParams())


def test_multi_turn_and_num_samples(tmp_path):
    conv = {
        "id": "m",
        "conversations": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "old1"},
            {"role": "user", "content": "q2"},
        ],
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(conv) + "\n")
    seen = []

    def plan(prompt, attempt):
        seen.append(prompt)
        return "ok"

    with FaultServer(plan) as server:
        summary = run_regeneration(
            OpenAIBackend([server.address], None, timeout=5),
            _opts(tmp_path / "in.jsonl", tmp_path / "out.jsonl", num_samples=2),
            SamplingParams(),
        )
    assert summary.ok == 2
    out = sorted(rows(tmp_path / "out.jsonl"), key=lambda r: r["id"])
    assert [r["id"] for r in out] == ["m#0", "m#1"]
    for r in out:
        roles = [m["role"] for m in r["conversations"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert r["conversations"][2]["content"].startswith("answer to: q1")
        assert r["conversations"][4]["content"].startswith("answer to: q2")
        assert r["regenerated"]["source_id"] == "m"
    assert sorted(seen) == ["q1", "q1", "q2", "q2"]


def test_sampling_params_reach_the_server_body():
    params = SamplingParams(
        temperature=0.5, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1, enable_thinking=False
    )
    kwargs = params.openai_kwargs()
    assert kwargs["temperature"] == 0.5 and kwargs["top_p"] == 0.9 and kwargs["max_tokens"] == 4096
    extra = kwargs["extra_body"]
    assert extra["top_k"] == 20 and extra["min_p"] == 0.05
    assert extra["repetition_penalty"] == extra["repeat_penalty"] == 1.1
    assert extra["chat_template_kwargs"] == {"enable_thinking": False}
    assert "extra_body" not in SamplingParams().openai_kwargs()


def test_no_api_key_is_sent_unless_asked(tmp_path):
    """OPENAI_* variables of the environment never reach a --server-address; --api-key-env
    NAME sends that variable's value and nothing else."""
    _write_prompts(tmp_path / "in.jsonl", 2)
    secret_env = {
        "OPENAI_API_KEY": "sk-secret-key",
        "OPENAI_ORG_ID": "org-secret",
        "OPENAI_PROJECT_ID": "proj-secret",
        "OPENAI_CUSTOM_HEADERS": "X-Leak: secret-header",
        "MY_SERVER_KEY": "local-key-123",
    }
    env = {**os.environ, **secret_env}
    with FaultServer(lambda p, a: "ok") as server:
        base = ["--server-address", server.address, "--input-file-path", str(tmp_path / "in.jsonl")]
        plain = run_generate([*base, "--output-file-path", str(tmp_path / "a.jsonl")], env=env, timeout=60)
        default_headers, server.headers = server.headers, []
        keyed = run_generate(
            [*base, "--output-file-path", str(tmp_path / "b.jsonl"), "--api-key-env", "MY_SERVER_KEY"],
            env=env,
            timeout=60,
        )
        keyed_headers = server.headers
    assert plain.returncode == 0 and keyed.returncode == 0, plain.stderr + keyed.stderr
    assert len(default_headers) == 3 and len(keyed_headers) == 3  # GET /v1/models + 2 rows each
    for headers in default_headers:
        assert headers.get("authorization") == "Bearer EMPTY"
        assert "secret" not in json.dumps(headers)
    for headers in keyed_headers:
        assert headers.get("authorization") == "Bearer local-key-123"
        assert "secret" not in json.dumps(headers)


def test_recorded_model_name_is_never_a_local_path(tmp_path):
    """llama.cpp lists the absolute path of its GGUF; rows record the file name only, and
    requests still name the model as the server lists it."""
    _write_prompts(tmp_path / "in.jsonl", 3)
    listed = "/home/someone/private/models/Target-1B.Q8_0.gguf"
    for model in (None, "Target-1B.Q8_0.gguf", "Target-1B.Q8_0"):
        out = tmp_path / f"out_{model}.jsonl"
        with FaultServer(lambda p, a: "ok", model=listed) as server:
            summary = run_regeneration(
                OpenAIBackend([server.address], model, timeout=5),
                _opts(tmp_path / "in.jsonl", out),
                SamplingParams(),
            )
            sent = set(server.request_models)
        assert summary.ok == 3 and sent == {listed}
        recorded = {r["regenerated"]["model"] for r in rows(out)}
        assert recorded == {model or "Target-1B.Q8_0.gguf"}, model


def test_model_mismatch_is_refused_before_anything_is_written(tmp_path):
    _write_prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "o" / "out.jsonl"
    with (
        FaultServer(lambda p, a: "ok", model="Qwen/Qwen3-4B") as a,
        FaultServer(lambda p, a: "ok", model="/srv/models/Llama-3.1-8B") as b,
    ):
        wrong = run_generate(
            ["--server-address", a.address, "--model", "Qwen/Qwen3-8B", "--input-file-path",
             str(tmp_path / "in.jsonl"), "--output-file-path", str(out)],
            timeout=60,
        )  # fmt: skip
        mixed = run_generate(
            ["--server-address", a.address, b.address, "--input-file-path", str(tmp_path / "in.jsonl"),
             "--output-file-path", str(out)],
            timeout=60,
        )  # fmt: skip
        posts = a.request_models + b.request_models
    assert wrong.returncode == 2 and wrong.stderr.count("error:") == 1
    assert f"the server at {a.address} serves 'Qwen/Qwen3-4B', not --model 'Qwen/Qwen3-8B'" in wrong.stderr
    assert mixed.returncode == 2 and mixed.stderr.count("error:") == 1
    assert "serve different models ('Qwen/Qwen3-4B'" in mixed.stderr and "'Llama-3.1-8B'" in mixed.stderr
    assert "/srv/models" not in mixed.stderr
    assert not posts and not (tmp_path / "o").exists()


def test_skip_bad_rows_counts_what_it_skips(tmp_path):
    ids = _write_prompts(tmp_path / "in.jsonl", 4)
    with open(tmp_path / "in.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "broken", "conversations": [\n')
        fh.write(json.dumps({"id": "norole", "conversations": [{"content": "x"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    with FaultServer(lambda p, a: "ok") as server:
        base = ["--server-address", server.address, "--input-file-path", str(tmp_path / "in.jsonl"),
                "--output-file-path", str(out)]  # fmt: skip
        strict = run_generate(base, timeout=60)
        assert strict.returncode == 2 and "in.jsonl:5:" in strict.stderr and not out.exists()
        lenient = run_generate([*base, "--skip-bad-rows"], timeout=60)
    assert lenient.returncode == 0, lenient.stderr
    assert "2 malformed rows skipped" in lenient.stdout
    assert sorted(r["id"] for r in rows(out)) == sorted(ids)


def test_hf_engine_generates_with_a_tiny_target(tmp_path, tiny_target):
    from deepspec.data.generation_backends import HFBackend

    data, ids = head(MINI, 3, tmp_path / "in.jsonl")
    backend = HFBackend(tiny_target("llama"), batch_size=2, dtype="fp32")
    summary = run_regeneration(
        backend,
        _opts(data, tmp_path / "out.jsonl", concurrency=3),
        SamplingParams(temperature=1.0, max_tokens=6),
    )
    assert (summary.ok, summary.failed) == (3, 0)
    convs = list(read_conversations(tmp_path / "out.jsonl"))
    assert sorted(c.id for c in convs) == sorted(ids)
    assert all(0 < c.extra["regenerated"]["completion_tokens"] <= 6 for c in convs)


# ---- launch_server.sh ----------------------------------------------------------------------


@needs_llamacpp
@pytest.mark.slow
def test_launch_server_two_llamacpp_workers_share_the_load(tmp_path):
    base = next(p for p in (find_free_port() for _ in range(50)) if p < 65000 and port_is_free(p + 1))
    logs = tmp_path / "logs"
    launch = ["bash", LAUNCH, "--engine", "llamacpp", "--log-dir", str(logs)]
    started = subprocess.run(
        [
            *launch,
            "--num-workers",
            "2",
            "--base-port",
            str(base),
            "--threads",
            "1",
            "--ctx",
            "1024",
            "--wait",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    pids = [int(p) for p in (logs / "pids").read_text().split()] if (logs / "pids").exists() else []
    try:
        assert started.returncode == 0, started.stderr
        assert f"--server-address 127.0.0.1:{base} 127.0.0.1:{base + 1}" in started.stdout
        data, ids = head(MINI, 4, tmp_path / "in.jsonl")
        proc = run_generate(
            [
                "--server-address", f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}",
                "--input-file-path", str(data), "--output-file-path", str(tmp_path / "out.jsonl"),
                "--max-tokens", "8", "--concurrency", "4",
            ],
            timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert sorted(r["id"] for r in rows(tmp_path / "out.jsonl")) == sorted(ids)
        for i in range(2):  # both workers answered
            assert "POST /v1/chat/completions" in (logs / f"worker_{i}.log").read_text(errors="replace")
    finally:
        stopped = subprocess.run([*launch, "--stop"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and len(pids) == 2
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} survived --stop")


@pytest.mark.skipif(
    not os.access(llama_server_bin(), os.X_OK)
    or not os.path.isfile(embedded_bf16_gguf_path("smollm2-135m-instruct")),
    reason="llama-server not built (bash scripts/setup.sh --llama-server)",
)
def test_native_llama_server_regenerates_with_parallel_slots(tmp_path):
    """The native llama-server engine: one worker with 4 slots answers 4 rows at once."""
    base = find_free_port()
    logs = tmp_path / "logs"
    launch = ["bash", LAUNCH, "--engine", "llama-server", "--log-dir", str(logs)]
    started = subprocess.run(
        [*launch, "--slots", "4", "--base-port", str(base), "--ctx", "1024", "--wait", "120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert started.returncode == 0, started.stderr
        data, ids = head(MINI, 4, tmp_path / "in.jsonl")
        proc = run_generate(
            [
                "--server-address", f"127.0.0.1:{base}",
                "--input-file-path", str(data), "--output-file-path", str(tmp_path / "out.jsonl"),
                "--max-tokens", "8", "--concurrency", "4",
            ],
            timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = rows(tmp_path / "out.jsonl")
        assert sorted(r["id"] for r in out) == sorted(ids)
        assert all(0 < r["regenerated"]["completion_tokens"] <= 8 for r in out)
    finally:
        subprocess.run([*launch, "--stop"], cwd=ROOT, capture_output=True, text=True, timeout=60)
