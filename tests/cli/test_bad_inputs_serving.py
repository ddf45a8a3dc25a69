"""Bad inputs to the serving and wrapper scripts (issue 24): scripts/serve/export.sh,
scripts/eval/eval.sh, scripts/train/train.sh, scripts/data/prepare_data.sh and
scripts/quickstart.sh keep the caller's working directory; scripts/serve/llamacpp.sh and
scripts/serve/vllm_generate.py check every argument before the engine starts;
scripts/data/launch_server.sh prints a stop command that survives paths with spaces.

Every case: a non-zero exit, one ``error:`` line, no traceback, nothing in the repository
changed, no engine started (the fake llama-server below records whether it ran)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

from tests.badinput import assert_one_error, assert_unchanged, digest_tree, run_cli
from tests.conftest import ROOT

EXPORT = os.path.join(ROOT, "scripts", "serve", "export.sh")
EVAL = os.path.join(ROOT, "scripts", "eval", "eval.sh")
TRAIN = os.path.join(ROOT, "scripts", "train", "train.sh")
PREPARE = os.path.join(ROOT, "scripts", "data", "prepare_data.sh")
QUICKSTART = os.path.join(ROOT, "scripts", "quickstart.sh")
LLAMACPP = os.path.join(ROOT, "scripts", "serve", "llamacpp.sh")
VLLM = os.path.join(ROOT, "scripts", "serve", "vllm_generate.py")
LAUNCH = os.path.join(ROOT, "scripts", "data", "launch_server.sh")


def _repo_entries() -> set[str]:
    return set(os.listdir(ROOT))


def _tiny_draft(tmp_path, target_dir: str, name: str = "mydraft") -> str:
    """A DSpark draft for a tiny target that the vLLM export accepts (q/k norms on)."""
    from tests.conftest import tiny_dspark

    out = tmp_path / name
    tiny_dspark(target_dir, opts=("model.qk_norm=true",)).save_pretrained(str(out))
    return str(out)


# ---- 1. wrappers keep the caller's working directory ---------------------------------
def test_export_sh_relative_paths_are_the_callers_not_the_repositorys(tmp_path):
    """`--out docs` typed elsewhere once replaced the repository's docs/."""
    docs = os.path.join(ROOT, "docs")
    before = digest_tree(docs)
    entries = _repo_entries()
    proc = run_cli(["bash", EXPORT, "missing_draft", "--to", "vllm", "--out", "docs"], cwd=str(tmp_path))
    assert_one_error(proc, "missing_draft", "does not exist", code=2)
    assert_unchanged(before, docs)
    assert _repo_entries() == entries
    assert not (tmp_path / "docs").exists()


def test_export_sh_finds_a_relative_draft_where_the_caller_stands(tmp_path, tiny_target):
    _tiny_draft(tmp_path, tiny_target("llama"))
    docs = os.path.join(ROOT, "docs")
    before = digest_tree(docs)
    entries = _repo_entries()
    proc = run_cli(
        ["bash", EXPORT, "mydraft", "--to", "vllm", "--out", "docs"], cwd=str(tmp_path), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "docs" / "deepspec_export.json").read_text())
    assert manifest["method"] == "dspark"
    assert_unchanged(before, docs)  # the repository's docs/ untouched
    assert _repo_entries() == entries


def test_eval_sh_relative_draft_is_the_callers(tmp_path):
    """eval.sh used to cd into the repository: a relative draft where the user stands was
    'missing'. Now it is looked up where the user stands; the repository's eval_datasets/
    stays the default prompt folder (no 'not a directory' error from elsewhere)."""
    entries = _repo_entries()
    env = {"draft_name_or_path": "rel_draft", "output_dir": "rel_out"}
    proc = run_cli(["bash", EVAL, "--tasks", "gsm8k", "--max-samples", "1"], env=env, cwd=str(tmp_path))
    assert_one_error(proc, "rel_draft", "does not exist", code=2)
    (tmp_path / "rel_draft").mkdir()  # exists where the caller stands: found, then judged
    proc = run_cli(["bash", EVAL, "--tasks", "gsm8k", "--max-samples", "1"], env=env, cwd=str(tmp_path))
    line = assert_one_error(proc, "rel_draft", code=2)
    assert "does not exist" not in line and "config.json" in line
    assert _repo_entries() == entries
    assert not os.path.exists(os.path.join(ROOT, "rel_out"))


def test_train_sh_relative_config_is_the_callers_and_shipped_ones_are_found(tmp_path):
    proc = run_cli(["bash", TRAIN, "my_config.py"], cwd=str(tmp_path), timeout=120)
    assert_one_error(proc, "my_config.py", code=2)
    # a shipped config named from the repository root: found from anywhere (the bad key
    # is reported, not the file)
    proc = run_cli(
        ["bash", TRAIN, "config/dspark/dspark_smollm2_135m.py", "--opts", "train.lrr=1"],
        cwd=str(tmp_path),
        timeout=120,
    )
    assert_one_error(proc, "train.lrr", code=2)
    # only options: the default config
    proc = run_cli(["bash", TRAIN, "--opts", "train.lrr=1"], cwd=str(tmp_path), timeout=120)
    assert_one_error(proc, "train.lrr", code=2)


def test_prepare_data_sh_work_dir_and_input_are_the_callers(tmp_path):
    entries = _repo_entries()
    env = {"INPUT": "no_prompts.jsonl", "WORK_DIR": "work", "ENGINE": "llamacpp", "PORT": "30000"}
    proc = run_cli(["bash", PREPARE], env=env, cwd=str(tmp_path), timeout=120)
    assert_one_error(proc, "no_prompts.jsonl")
    assert (tmp_path / "work").is_dir()  # WORK_DIR landed where the caller stands
    assert _repo_entries() == entries


def test_quickstart_resolves_work_and_input_where_the_caller_stands(tmp_path):
    (tmp_path / "afile").write_text("not a directory\n")
    proc = run_cli(["bash", QUICKSTART, "--fast"], env={"WORK": "afile"}, cwd=str(tmp_path), timeout=60)
    assert_one_error(proc, "WORK=afile", "is a file", code=2)
    assert "== 1/5" not in proc.stdout
    proc = run_cli(
        ["bash", QUICKSTART, "--fast"],
        env={"WORK": "w", "INPUT": "prompts.jsonl"},
        cwd=str(tmp_path),
        timeout=60,
    )
    assert_one_error(proc, "prompts.jsonl", str(tmp_path), code=2)
    assert not (tmp_path / "w").exists()


# ---- 2. scripts/serve/llamacpp.sh ------------------------------------------------------
@pytest.fixture
def fake_llama(tmp_path):
    """A stand-in llama-server that records its arguments, and GGUF-looking files."""
    marker = tmp_path / "ran"
    fake = tmp_path / "llama-server"
    fake.write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(marker))}\n')
    fake.chmod(0o755)
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    (tmp_path / "d.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return {"env": {"LLAMA_SERVER_BIN": str(fake)}, "marker": marker}


def _serve(tmp_path, fake, *args):
    return run_cli(["bash", LLAMACPP, *args], env=fake["env"], cwd=str(tmp_path), timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--port", "70000"], ["--port must be a positive integer from 1 to 65535", "70000"]),
        (["--port", "0"], ["--port must be a positive integer from 1 to 65535"]),
        (["--p-min", "1.5"], ["--p-min must be a number from 0 to 1", "1.5"]),
        (["--p-min", "nan"], ["--p-min must be a number from 0 to 1"]),
        (["--p-min", "-0.1"], ["--p-min must be a number from 0 to 1"]),
        (["--port"], ["--port needs a value"]),
        (["--n-max", "--port", "8080"], ["--n-max needs a value"]),
        (["--threads", "99999999999"], ["--threads must be a positive integer"]),
    ],
)
def test_llamacpp_sh_bad_values(tmp_path, fake_llama, args, fragments):
    proc = _serve(tmp_path, fake_llama, "--draft", "d.gguf", "--target", "t.gguf", *args)
    assert_one_error(proc, *fragments, code=2)
    assert not fake_llama["marker"].exists()


def test_llamacpp_sh_option_without_value_is_one_line(tmp_path, fake_llama):
    """`--draft` as the last argument used to exit 1 silently (shift 2 under set -e)."""
    proc = _serve(tmp_path, fake_llama, "--target", "t.gguf", "--draft")
    assert_one_error(proc, "--draft needs a value", code=2)
    assert not fake_llama["marker"].exists()


def test_llamacpp_sh_refuses_a_taken_port_before_starting(tmp_path, fake_llama):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = _serve(tmp_path, fake_llama, "--draft", "d.gguf", "--target", "t.gguf", "--port", str(port))
    assert_one_error(proc, f"port {port}", "already in use", "--port", code=2)
    assert not fake_llama["marker"].exists()


@pytest.mark.parametrize("which", ["--draft", "--target"])
def test_llamacpp_sh_refuses_a_file_that_is_not_gguf(tmp_path, fake_llama, which):
    files = {"--draft": "d.gguf", "--target": "t.gguf", which: "w.safetensors"}
    proc = _serve(tmp_path, fake_llama, *[x for kv in files.items() for x in kv], "--port", str(_free_port()))
    assert_one_error(proc, f"{which} w.safetensors is not a GGUF file", code=2)
    assert "null byte" not in proc.stderr  # the magic is read without bash warnings
    assert not fake_llama["marker"].exists()


def test_llamacpp_sh_export_directory_names_the_gguf_inside(tmp_path, fake_llama):
    (tmp_path / "exp dir").mkdir()
    (tmp_path / "exp dir" / "draft.gguf").write_bytes(b"GGUF" + bytes(8))
    proc = _serve(tmp_path, fake_llama, "--draft", "exp dir", "--target", "t.gguf")
    assert_one_error(proc, "export directory", "--draft exp\\ dir/draft.gguf", code=2)


def test_llamacpp_sh_good_arguments_still_start_the_server(tmp_path, fake_llama):
    port = _free_port()
    proc = _serve(
        tmp_path, fake_llama, "--draft", "d.gguf", "--target", "t.gguf", "--port", str(port),
        "--p-min", "0.5", "--n-max", "5", "--", "--verbose",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ran = fake_llama["marker"].read_text().split()
    assert ran[:2] == ["-m", "t.gguf"] and ran[ran.index("--port") + 1] == str(port)
    assert ran[ran.index("-md") + 1] == "d.gguf" and ran[ran.index("--spec-draft-p-min") + 1] == "0.5"
    assert ran[-1] == "--verbose"


# ---- 3. scripts/serve/vllm_generate.py ---------------------------------------------------
@pytest.fixture
def vllm_inputs(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"vocab_size": 100}))
    (tmp_path / "prompts.json").write_text("[[1, 2, 3], [4, 5]]")
    return {"--target": str(target), "--prompts": str(tmp_path / "prompts.json")}


def _vllm_generate(inputs: dict, *extra: str, python: str = sys.executable, env=None):
    args = [python, VLLM, *[x for kv in inputs.items() for x in kv], *extra]
    return run_cli(args, env=env, timeout=120)


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ["does not exist"]),
        ("", ["not valid JSON"]),
        ("[]", ["non-empty JSON list"]),
        ('{"prompts": [[1]]}', ["non-empty JSON list"]),
        ("[[1, 2], []]", ["prompt 1", "non-empty list"]),
        ("[[1, -2]]", ["prompt 0", "-2"]),
        ('[[1, "a"]]', ["prompt 0", "'a'"]),
        ("[[1, 2.5]]", ["prompt 0", "2.5"]),
        ("[[1, true]]", ["prompt 0", "True"]),
        ("[[1, 100]]", ["token id 100", "vocabulary of 100"]),
        ("[[1, 2]", ["not valid JSON"]),
    ],
)
def test_vllm_generate_bad_prompts(tmp_path, vllm_inputs, content, fragments):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    proc = _vllm_generate({**vllm_inputs, "--prompts": str(path)})
    assert_one_error(proc, "--prompts", *fragments, code=2)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--batch", "0"], ["--batch", "'0'"]),
        (["--batch", "1,four"], ["--batch", "1,four"]),
        (["--batch", "2.5"], ["--batch"]),
        (["--k", "0"], ["--k must be an integer >= 1"]),
        (["--k", "x"], ["--k must be an integer >= 1"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens must be an integer >= 1"]),
        (["--max-new-tokens", "5000"], ["--max-new-tokens must be below 2048"]),
        (["--method", "medusa"], ["--method", "eagle3", "dspark"]),
        (["--dtype", "fp16"], ["--dtype", "bfloat16", "float16", "float32"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_vllm_generate_bad_arguments_before_vllm(vllm_inputs, extra, fragments):
    assert_one_error(_vllm_generate(vllm_inputs, *extra), *fragments, code=2)


def test_vllm_generate_bad_target(tmp_path, vllm_inputs):
    prompts = {"--prompts": vllm_inputs["--prompts"]}
    proc = _vllm_generate({"--target": str(tmp_path / "nowhere"), **prompts})
    assert_one_error(proc, "--target", "does not exist", "config.json", code=2)
    (tmp_path / "empty").mkdir()
    proc = _vllm_generate({"--target": str(tmp_path / "empty"), **prompts})
    assert_one_error(proc, "--target", "no config.json", code=2)
    proc = _vllm_generate({"--target": vllm_inputs["--prompts"], **prompts})
    assert_one_error(proc, "--target", "is a file", code=2)
    proc = _vllm_generate({"--target": "embedded:smollm2-135m-instruct", **prompts})
    assert_one_error(proc, "python -m deepspec.targets resolve embedded:smollm2-135m-instruct", code=2)


def test_vllm_generate_bad_drafts(tmp_path, vllm_inputs):
    # a deepspec training checkpoint: config.json (with deepspec_version) + model.safetensors
    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["DSparkDraft"], "deepspec_version": "0.1.0"})
    )
    (ckpt / "model.safetensors").write_bytes(b"")
    proc = _vllm_generate(vllm_inputs, "--draft", str(ckpt))
    assert_one_error(
        proc, "training checkpoint", f"python -m deepspec.export {ckpt} --to vllm --out DIR", code=2
    )
    # a checkpoint whose config.json says nothing, but trainer_state/ sits beside it
    plain = tmp_path / "step_5"
    (plain / "trainer_state").mkdir(parents=True)
    (plain / "config.json").write_text("{}")
    proc = _vllm_generate(vllm_inputs, "--draft", str(plain))
    assert_one_error(proc, "training checkpoint", code=2)
    # a llama.cpp export (its manifest names no vLLM method)
    gguf = tmp_path / "gguf_export"
    gguf.mkdir()
    (gguf / "deepspec_export.json").write_text(json.dumps({"spec_type": "draft-dspark", "n_max": 7}))
    proc = _vllm_generate(vllm_inputs, "--draft", str(gguf))
    assert_one_error(proc, "not a vLLM export", "--to vllm", code=2)
    # a DSpark export served as Eagle3
    export = tmp_path / "export"
    export.mkdir()
    (export / "deepspec_export.json").write_text(
        json.dumps({"method": "dspark", "num_speculative_tokens": 7})
    )
    (export / "config.json").write_text("{}")
    proc = _vllm_generate(vllm_inputs, "--draft", str(export), "--method", "eagle3")
    assert_one_error(proc, "dspark export", "--method dspark", code=2)
    proc = _vllm_generate(vllm_inputs, "--draft", str(tmp_path / "nowhere"))
    assert_one_error(proc, "--draft", "does not exist", "deepspec.export", code=2)
    proc = _vllm_generate(vllm_inputs, "--draft", vllm_inputs["--prompts"])
    assert_one_error(proc, "--draft", "is a file", code=2)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_generate_without_vllm_names_the_venv(vllm_inputs, tmp_path):
    from deepspec.targets import cache_root

    export = tmp_path / "export"
    export.mkdir()
    (export / "deepspec_export.json").write_text(
        json.dumps({"method": "dspark", "num_speculative_tokens": 7})
    )
    (export / "config.json").write_text("{}")
    proc = _vllm_generate(vllm_inputs, "--draft", str(export))  # every input is good
    venv_python = os.path.join(cache_root(), "vllm-venv", "bin", "python")
    assert_one_error(proc, "vLLM is not installed", "bash scripts/setup.sh --serving", venv_python, code=2)


def _vllm_python() -> str | None:
    from deepspec.targets import cache_root

    path = os.path.join(cache_root(), "vllm-venv", "bin", "python")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(_vllm_python() is None, reason="no vLLM venv (bash scripts/setup.sh --serving)")
def test_vllm_generate_checks_run_in_the_vllm_venv(tmp_path, vllm_inputs):
    """The venv does not install deepspec: the script imports it from the checkout."""
    proc = _vllm_generate(vllm_inputs, "--batch", "0", python=_vllm_python(), env={"PYTHONPATH": ""})
    assert_one_error(proc, "--batch", code=2)
    proc = _vllm_generate(
        {**vllm_inputs, "--prompts": str(tmp_path / "none.json")},
        python=_vllm_python(),
        env={"PYTHONPATH": ""},
    )
    assert_one_error(proc, "--prompts", "does not exist", code=2)


# ---- 4. scripts/quickstart.sh: every profile value before the first stage -------------------
@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"ALGOS": "dspark,medusa"}, ["ALGOS", "'medusa'", "dspark, dflash, eagle3"]),
        ({"ALGOS": "dspark dspark"}, ["ALGOS", "'dspark' twice"]),
        ({"ALGOS": " , "}, ["ALGOS is empty"]),
        ({"TASKS": "gsm8k,no-such-task"}, ["TASKS", "'no-such-task'", "mt-bench"]),
        ({"TASKS": "gsm8k gsm8k"}, ["TASKS", "twice"]),
        ({"TEMPERATURES": "1,inf"}, ["TEMPERATURES", "'inf'"]),
        ({"TEMPERATURES": "-1"}, ["TEMPERATURES", "'-1'"]),
        ({"EVAL_DTYPE": "fp16"}, ["EVAL_DTYPE=fp16", "auto, bf16 or fp32"]),
        ({"INPUT": "no/such/prompts.jsonl"}, ["INPUT", "no/such/prompts.jsonl"]),
        ({"TRAIN_OPTS": "train.lr"}, ["TRAIN_OPTS", "'train.lr'", "key=value"]),
        ({"TRAIN_OPTS": "logging.logging_steps=1 train.lrr=1"}, ["TRAIN_OPTS", "train.lrr"]),
        # commas and spaces are both separators: the lists pass, the last value stops it
        (
            {
                "ALGOS": "dspark,dflash",
                "TASKS": "gsm8k mt-bench",
                "TEMPERATURES": "1.0,0",
                "TRAIN_OPTS": "oops",
            },
            ["TRAIN_OPTS", "'oops'"],
        ),
    ],
)
def test_quickstart_checks_every_profile_value_first(tmp_path, env, fragments):
    work = tmp_path / "work"
    entries = _repo_entries()
    proc = run_cli(
        ["bash", QUICKSTART, "--fast"], env={**env, "WORK": str(work)}, cwd=str(tmp_path), timeout=60
    )
    assert_one_error(proc, *fragments, code=2)
    assert "== 1/5" not in proc.stdout
    assert not work.exists()
    assert _repo_entries() == entries


def test_quickstart_work_that_is_a_file(tmp_path):
    work = tmp_path / "work"
    work.write_text("keep me\n")
    before = digest_tree(str(work))
    proc = run_cli(["bash", QUICKSTART, "--fast"], env={"WORK": str(work)}, timeout=60)
    assert_one_error(proc, "is a file", code=2)
    assert "== 1/5" not in proc.stdout
    assert_unchanged(before, str(work))


# ---- 5. printed commands quote paths with spaces -------------------------------------------
FAKE_SERVER = """#!{python}
import http.server, json, sys
args = sys.argv[1:]
port, model = int(args[args.index("--port") + 1]), args[args.index("-m") + 1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"data": [{{"id": model}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_launch_server_stop_hint_quotes_paths_with_spaces(tmp_path):
    """The printed stop command, run as printed, stops the worker (a stand-in llama-server)."""
    space = tmp_path / "with space"
    space.mkdir()
    fake = space / "llama-server"
    fake.write_text(FAKE_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    model = space / "my model.gguf"
    model.write_bytes(b"GGUF" + bytes(8))
    logs = space / "log dir"
    args = ["--engine", "llama-server", "--model", str(model), "--log-dir", str(logs)]
    args += ["--base-port", str(_free_port()), "--threads", "1", "--slots", "1", "--wait", "60"]
    proc = run_cli(
        ["bash", LAUNCH, *args], env={"LLAMA_SERVER_BIN": str(fake)}, cwd=str(tmp_path), timeout=120
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        stop = next(line for line in proc.stdout.splitlines() if line.startswith("stop: "))
        words = shlex.split(stop[len("stop: ") :])
        assert words[:2] == ["bash", LAUNCH]
        assert words[words.index("--model") + 1] == str(model)
        assert words[words.index("--log-dir") + 1] == str(logs)
        pid = int((logs / "pids").read_text().split()[0])
        done = subprocess.run(words, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and f"stopped worker pid {pid}" in done.stdout, done.stdout + done.stderr
        assert not (logs / "pids").exists()
    finally:
        run_cli(["bash", LAUNCH, *args[:6], "--stop"], cwd=str(tmp_path), timeout=60)
