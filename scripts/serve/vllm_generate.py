"""Greedy generation with vLLM and (optionally) an exported draft; run it with the vLLM
virtualenv's python (``bash scripts/setup.sh --serving`` makes ``<cache root>/vllm-venv``).

    <cache root>/vllm-venv/bin/python scripts/serve/vllm_generate.py --target <HF target dir> \\
        --prompts prompts.json [--draft <export dir> --method eagle3|dspark --k 7] \\
        [--max-new-tokens 64] [--batch 1,4] [--dtype bfloat16|float16|float32]

``prompts.json`` holds a non-empty list of token-id lists. Prints one JSON object: the
generated tokens (first batch size), tokens/s per batch size (``B`` prompts per ``generate``
call), the engine's start time, and with a draft vLLM's spec-decode counters and the mean
acceptance length ``1 + accepted / drafts`` (bonus token included).

``--draft`` is a directory written by ``python -m deepspec.export <draft> --to vllm --out DIR``
(its ``deepspec_export.json`` names the method; ``--method`` defaults to it), or another
Eagle3 draft in Hugging Face format. Every argument is checked before vLLM is imported:
a bad one is a single ``error:`` line and exit 2.

Settings for a small CPU machine: in-process engine, one OpenMP thread, eager mode, a
256 MiB KV cache (vLLM otherwise reserves most of the RAM). bf16 matmuls of different
shapes can flip near-tied greedy choices; compare outputs token for token in float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The vLLM virtualenv does not install deepspec: import it from this checkout. Appended, so
# that nothing in the repository shadows a package of the virtualenv. deepspec.cli and
# deepspec.errors import only the standard library.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from deepspec.cli import ArgumentParser, run_main  # noqa: E402
from deepspec.errors import ConfigError, DataError, EnvironmentProblem  # noqa: E402

METHODS = ("eagle3", "dspark")  # what deepspec's vLLM exports write (deepspec/export/engines.py)
DTYPES = ("bfloat16", "float16", "float32")
MAX_MODEL_LEN = 2048
EXPORT_MANIFEST = "deepspec_export.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")
EXPORT_IT = "python -m deepspec.export <draft> --to vllm --out DIR"


def cache_root() -> str:
    """deepspec's cache root, as ``deepspec.targets.cache_root`` (not imported: it pulls torch)."""
    return os.path.expanduser(os.environ.get("DEEPSPEC_CACHE_DIR") or "~/.cache/deepspec")


def positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {value}")
        return value

    return parse


def parse_batches(text: str) -> list[int]:
    """``--batch 1,4`` -> [1, 4]: positive integers separated by commas."""
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"[1-9][0-9]{0,8}", item) for item in items):
        raise ConfigError(
            f"--batch must be positive integers separated by commas (e.g. --batch 1,4), got {text!r}"
        )
    return [int(item) for item in items]


def read_json(path: str, what: str):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot read {what} {path} ({exc.strerror or exc}): check the path"
        ) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {exc.start}): pass a JSON file") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{what} {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); fix the file"
        ) from None


def load_prompts(path: str) -> list[list[int]]:
    """A non-empty JSON list of non-empty lists of non-negative token ids."""
    if not os.path.exists(path):
        raise DataError(f"--prompts {path} does not exist; pass a JSON file with a list of token-id lists")
    if not os.path.isfile(path):
        raise DataError(f"--prompts {path} is not a file; pass a JSON file with a list of token-id lists")
    prompts = read_json(path, "--prompts")
    shape = "a non-empty JSON list of non-empty lists of token ids, e.g. [[1, 2, 3], [4, 5]]"
    if not isinstance(prompts, list) or not prompts:
        raise DataError(f"--prompts {path} must hold {shape}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise DataError(
                f"--prompts {path}: prompt {i} is not a non-empty list; the file must hold {shape}"
            )
        for token in prompt:
            if type(token) is not int or token < 0:
                raise DataError(
                    f"--prompts {path}: prompt {i} holds {token!r}, not a token id (an integer >= 0)"
                )
    return prompts


def check_target(target: str) -> dict | None:
    """A local HF directory with config.json (returns the config), or a hub id passed on."""
    if os.path.isdir(target):
        config = os.path.join(target, "config.json")
        if not os.path.isfile(config):
            raise ConfigError(
                f"--target {target} has no config.json; pass the target's Hugging Face model directory"
            )
        loaded = read_json(config, "target config")
        return loaded if isinstance(loaded, dict) else None
    if os.path.exists(target):
        raise ConfigError(f"--target {target} is a file; pass the target's Hugging Face model directory")
    if target.startswith("embedded:"):
        raise ConfigError(
            f"--target {target}: vLLM needs its directory; pass the path that "
            f"python -m deepspec.targets resolve {shlex.quote(target)} prints"
        )
    if HUB_ID.match(target) and not target.startswith((".", "~")):
        return None  # a hub id such as Qwen/Qwen3-4B: vLLM downloads it
    raise ConfigError(
        f"--target {target} does not exist; pass the target's Hugging Face model directory "
        "(with config.json) or a hub id such as Qwen/Qwen3-4B"
    )


def check_draft(draft: str, method: str | None) -> str:
    """The method to serve ``draft`` with; refuses what is not a vLLM draft."""
    export_hint = f"export it first with python -m deepspec.export {shlex.quote(draft)} --to vllm --out DIR"
    if not os.path.isdir(draft):
        if os.path.exists(draft):
            raise ConfigError(f"--draft {draft} is a file; pass the directory written by {EXPORT_IT}")
        if HUB_ID.match(draft) and not draft.startswith((".", "~")):
            return method or "eagle3"  # a hub id: vLLM downloads it
        raise ConfigError(f"--draft {draft} does not exist; pass the directory written by {EXPORT_IT}")
    manifest_path = os.path.join(draft, EXPORT_MANIFEST)
    if os.path.isfile(manifest_path):
        manifest = read_json(manifest_path, "export manifest")
        exported = manifest.get("method") if isinstance(manifest, dict) else None
        if exported not in METHODS:
            raise ConfigError(
                f"--draft {draft} is not a vLLM export ({EXPORT_MANIFEST} names no vLLM method); "
                f"export the draft with {EXPORT_IT}"
            )
        if method is not None and method != exported:
            raise ConfigError(
                f"--draft {draft} is a {exported} export but --method is {method}; "
                f"pass --method {exported} or leave --method out"
            )
        return exported
    config_path = os.path.join(draft, "config.json")
    config = read_json(config_path, "draft config") if os.path.isfile(config_path) else None
    training = (isinstance(config, dict) and "deepspec_version" in config) or os.path.isdir(
        os.path.join(draft, "trainer_state")
    )
    if training:
        raise ConfigError(f"--draft {draft} is a deepspec training checkpoint, not an export; {export_hint}")
    if config is None:
        raise ConfigError(f"--draft {draft} has no config.json; pass the directory written by {EXPORT_IT}")
    return method or "eagle3"  # another HF-format Eagle3 draft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="vllm_generate.py",
        description="Greedy generation with vLLM and an optional exported draft.",
    )
    parser.add_argument("--target", required=True, help="the target's HF directory (or a hub id)")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--draft", help="export directory (python -m deepspec.export --to vllm)")
    parser.add_argument(
        "--method", choices=METHODS, default=None, help="speculative method (default: the export's)"
    )
    parser.add_argument("--k", type=positive("--k"), default=7, help="tokens drafted per round")
    parser.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=64)
    parser.add_argument("--batch", default="1", help="prompts per generate call, e.g. 1,4")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="bfloat16", help="float32 for bit-exact greedy comparisons"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[list[int]], list[int], str | None]:
    """Every input checked before vLLM is imported: (prompts, batch sizes, method)."""
    batches = parse_batches(args.batch)
    if args.max_new_tokens >= MAX_MODEL_LEN:
        raise ConfigError(
            f"--max-new-tokens must be below {MAX_MODEL_LEN} (the engine's context), got {args.max_new_tokens}"
        )
    target_config = check_target(args.target)
    method = check_draft(args.draft, args.method) if args.draft else None
    prompts = load_prompts(args.prompts)
    vocab = (target_config or {}).get("vocab_size")
    for i, prompt in enumerate(prompts):
        if isinstance(vocab, int) and max(prompt) >= vocab:
            raise DataError(
                f"--prompts {args.prompts}: prompt {i} holds token id {max(prompt)}, outside the "
                f"target's vocabulary of {vocab}; tokenize the prompts with the target's tokenizer"
            )
        if len(prompt) + args.max_new_tokens > MAX_MODEL_LEN:
            raise DataError(
                f"--prompts {args.prompts}: prompt {i} has {len(prompt)} tokens; with --max-new-tokens "
                f"{args.max_new_tokens} it exceeds the engine's {MAX_MODEL_LEN}-token context: shorten it "
                "or lower --max-new-tokens"
            )
    if importlib.util.find_spec("vllm") is None:
        raise EnvironmentProblem(
            f"vLLM is not installed for {sys.executable}; run bash scripts/setup.sh --serving and use "
            f"{shlex.quote(os.path.join(cache_root(), 'vllm-venv', 'bin', 'python'))}"
        )
    return prompts, batches, method


def spec_counters(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if "spec_decode" in metric.name:
            out[metric.name.split(":")[-1]] = (
                list(metric.values) if hasattr(metric, "values") else metric.value
            )
    return out


def main() -> int:
    args = parse_args()
    prompts, batches, method = check_args(args)

    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=args.target,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        seed=0,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=256 * 2**20,
        disable_log_stats=False,
    )
    if args.draft:
        kwargs["speculative_config"] = {
            "method": method,
            "model": args.draft,
            "num_speculative_tokens": args.k,
        }
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict = {"start_s": round(time.perf_counter() - start, 1), "runs": {}}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    before = spec_counters(llm)
    for i, batch in enumerate(batches):
        tokens, t0 = [], time.perf_counter()
        for lo in range(0, len(prompts), batch):
            chunk = [{"prompt_token_ids": p} for p in prompts[lo : lo + batch]]
            tokens += [list(o.outputs[0].token_ids) for o in llm.generate(chunk, params, use_tqdm=False)]
        seconds = time.perf_counter() - t0
        n = sum(map(len, tokens))
        result["runs"][str(batch)] = {
            "tokens": n,
            "seconds": round(seconds, 2),
            "tok_s": round(n / seconds, 1),
        }
        if i == 0:
            result["tokens"] = tokens
            if args.draft:
                after = spec_counters(llm)
                diff = {
                    k: [a - b for a, b in zip(v, before.get(k, [0] * len(v)))]
                    if isinstance(v, list)
                    else v - before.get(k, 0)
                    for k, v in after.items()
                }
                drafts = diff.get("spec_decode_num_drafts", 0)
                result["spec"] = diff
                result["tau"] = (
                    round(1 + diff.get("spec_decode_num_accepted_tokens", 0) / drafts, 3) if drafts else None
                )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
