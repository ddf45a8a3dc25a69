"""Evaluation driver: benchmarks → speculative decoding (+ the plain baseline) → metrics,
``results.json``, ``samples.jsonl``, plots and a printed table.

Timing: for each prompt the speculative run and the plain target run are interleaved in
the same process with the same limits; one short warm-up generation per dataset is not
timed. ``speedup`` = speculative tokens/s ÷ plain tokens/s over the dataset.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from deepspec.config.schema import DEFAULT_EVAL_TASKS
from deepspec.data.chat import ChatTokenizer
from deepspec.data.eval_prompts import load_eval_prompts
from deepspec.errors import DataError
from deepspec.eval.decode import DecodeResult, plain_generate, speculative_generate
from deepspec.eval.metrics import acceptance_stats, calibration_stats, macro_average, threshold_sweep
from deepspec.eval.target import HFTarget
from deepspec.utils.io import atomic_open, atomic_write_json

MACRO_KEYS = ("acceptance_length", "speedup", "verify_rate", "draft_tokens_per_proposal")


@dataclass
class EvalSettings:
    tasks: list[str]
    max_samples: int | None = None
    max_new_tokens: int = 2048
    temperature: float = 1.0
    confidence_threshold: float = 0.0
    seed: int = 980406
    eval_datasets_dir: str = "eval_datasets"
    output_dir: str | None = None
    baseline: bool = True
    dtype: str = "auto"  # auto: fp32 at temperature 0 (bit-exact greedy), else bf16
    progress: bool = True


def check_draft_matches_target(draft, spec, target_name: str) -> None:
    """Refuse a draft trained for another target (sizes, vocabulary, layers)."""
    mine = draft.spec
    problems = [
        f"{field} {getattr(mine, field)} != {getattr(spec, field)}"
        for field in ("family", "hidden_size", "vocab_size", "num_hidden_layers")
        if getattr(mine, field) != getattr(spec, field)
    ]
    if problems:
        raise DataError(f"draft was trained for another target than {target_name}: " + ", ".join(problems))


class Evaluator:
    """Holds the target, tokenizer and draft; evaluates tasks one after another."""

    def __init__(self, target_dir: str, draft, settings: EvalSettings, target_name: str = "") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deepspec.targets.family import load_family_spec

        self.settings = settings
        self.target_name = target_name or target_dir
        spec = load_family_spec(target_dir)
        check_draft_matches_target(draft, spec, self.target_name)
        if settings.dtype == "auto":
            settings.dtype = "fp32" if settings.temperature == 0 else "bf16"
        dtype = torch.bfloat16 if settings.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        self.target = HFTarget(model, draft.config.target_layer_ids)
        self.draft = draft.to(dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(target_dir)
        self.chat = ChatTokenizer(self.tokenizer, enable_thinking=False)
        eos = set(spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = eos

    def _generate(self, prompt_ids: list[int], seed: int, max_new: int | None = None) -> tuple:
        s = self.settings
        limit = max_new or s.max_new_tokens
        g = torch.Generator().manual_seed(seed)
        spec = speculative_generate(
            self.target,
            self.draft,
            prompt_ids,
            max_new_tokens=limit,
            temperature=s.temperature,
            eos_ids=self.eos_ids,
            generator=g,
            confidence_threshold=s.confidence_threshold,
        )
        base = None
        if s.baseline:
            g = torch.Generator().manual_seed(seed)
            base = plain_generate(
                self.target,
                prompt_ids,
                max_new_tokens=limit,
                temperature=s.temperature,
                eos_ids=self.eos_ids,
                generator=g,
            )
        return spec, base

    def run_task(self, task: str, samples_fh) -> dict[str, Any]:
        s = self.settings
        cap = s.max_samples or DEFAULT_EVAL_TASKS.get(task)
        prompts = load_eval_prompts(task, s.eval_datasets_dir, max_samples=cap, seed=s.seed)
        encoded = [self.chat.prompt_ids([{"role": "user", "content": p.text}]) for p in prompts]
        self._generate(encoded[0], s.seed, max_new=min(8, s.max_new_tokens))  # warm-up, untimed
        runs: list[tuple[DecodeResult, DecodeResult | None]] = []
        bar = tqdm(list(zip(prompts, encoded)), desc=f"eval {task}", unit="prompt", disable=not s.progress)
        for prompt, ids in bar:
            spec, base = self._generate(ids, s.seed + prompt.index)
            runs.append((spec, base))
            record = {
                "dataset": task,
                "index": prompt.index,
                "prompt_token_ids": ids,
                "output_token_ids": spec.output_ids,
                "accepted_per_round": spec.accepted,
                "proposed_per_round": spec.proposed,
                "seconds": round(spec.seconds, 4),
            }
            if base is not None:
                record["baseline_output_tokens"] = len(base.output_ids)
                record["baseline_seconds"] = round(base.seconds, 4)
            samples_fh.write(json.dumps(record) + "\n")
            samples_fh.flush()
            rounds = sum(len(r.accepted) for r, _ in runs)
            bar.set_postfix(tau=f"{(sum(sum(r.accepted) for r, _ in runs) + rounds) / max(1, rounds):.2f}")
        return self._task_metrics(task, runs)

    def _task_metrics(
        self, task: str, runs: list[tuple[DecodeResult, DecodeResult | None]]
    ) -> dict[str, Any]:
        s = self.settings
        proposed = [k for r, _ in runs for k in r.proposed]
        accepted = [m for r, _ in runs for m in r.accepted]
        out: dict[str, Any] = {"dataset": task, "num_prompts": len(runs)}
        out.update(acceptance_stats(proposed, accepted).to_dict())
        spec_tokens = sum(len(r.output_ids) for r, _ in runs)
        spec_seconds = sum(r.seconds for r, _ in runs)
        out["output_tokens"] = spec_tokens
        out["tokens_per_second"] = spec_tokens / max(spec_seconds, 1e-9)
        if s.baseline:
            base_tokens = sum(len(b.output_ids) for _, b in runs)
            base_seconds = sum(b.seconds for _, b in runs)
            out["baseline_tokens_per_second"] = base_tokens / max(base_seconds, 1e-9)
            out["speedup"] = out["tokens_per_second"] / out["baseline_tokens_per_second"]
            if s.temperature == 0:
                out["greedy_match_rate"] = sum(r.output_ids == b.output_ids for r, b in runs) / len(runs)
        conf = [c for r, _ in runs for c in r.confidences]
        if conf and len(conf) == len(proposed):
            cut = [c[:k] for c, k in zip(conf, proposed)]  # positions that were verified
            out["calibration"] = [c.to_dict() for c in calibration_stats(cut, proposed, accepted)]
            if s.confidence_threshold == 0:  # the sweep needs untruncated proposals
                out["threshold_sweep"] = threshold_sweep(cut, proposed, accepted).to_dict()
        return out

    def evaluate(self) -> dict[str, Any]:
        s = self.settings
        out_dir = s.output_dir
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        samples_path = os.path.join(out_dir, "samples.jsonl") if out_dir else os.devnull
        start = time.perf_counter()
        per_task = []
        with atomic_open(samples_path, "w", encoding="utf-8") if out_dir else open(os.devnull, "w") as fh:
            for task in s.tasks:
                per_task.append(self.run_task(task, fh))
        results = {
            "config": {
                **asdict(s),
                "target": self.target_name,
                "draft_algorithm": self.draft.algorithm,
                "draft_config": self.draft.config_json(),
            },
            "datasets": per_task,
            "macro_average": macro_average(per_task, MACRO_KEYS),
            "seconds": time.perf_counter() - start,
        }
        if out_dir:
            atomic_write_json(os.path.join(out_dir, "results.json"), results)
            write_plots(results, out_dir)
        return results


def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """Per-position conditional acceptance per dataset; reliability diagrams and threshold
    sweeps for drafts with a confidence head."""
    from deepspec.eval.plots import plot_conditional_acceptance, plot_reliability, plot_threshold_sweep

    datasets = results["datasets"]
    paths = [
        plot_conditional_acceptance(
            {d["dataset"]: d for d in datasets}, os.path.join(out_dir, "conditional_acceptance.png")
        )
    ]
    for d in datasets:
        if d.get("calibration"):
            paths.append(
                plot_reliability(
                    d["calibration"],
                    os.path.join(out_dir, f"reliability_{d['dataset']}.png"),
                    title=d["dataset"],
                )
            )
    sweeps = {d["dataset"]: d["threshold_sweep"] for d in datasets if d.get("threshold_sweep")}
    if sweeps:
        paths.append(plot_threshold_sweep(sweeps, os.path.join(out_dir, "threshold_sweep.png")))
    return paths


def format_table(results: dict[str, Any], draft_name: str) -> str:
    """The reference-style table: one row per dataset plus the macro average."""
    rows = results["datasets"]
    k_max = max((len(d.get("accept_rate_at_k") or []) for d in rows), default=0)
    head = ["dataset", "target", "draft", "#propose", "accept_len", "verify_rate"]
    head += [f"acc@{k + 1}" for k in range(k_max)] + ["speedup"]
    table = [head]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    target = os.path.basename(str(results["config"]["target"]).rstrip("/"))
    for d in rows:
        rates = list(d.get("accept_rate_at_k") or []) + [None] * k_max
        table.append(
            [
                d["dataset"],
                target,
                draft_name,
                str(d.get("num_rounds", 0)),
                fmt(d.get("acceptance_length")),
                fmt(d.get("verify_rate")),
            ]
            + [fmt(r) for r in rates[:k_max]]
            + [fmt(d.get("speedup"))]
        )
    macro = results["macro_average"]
    table.append(
        ["macro", target, draft_name, "", fmt(macro.get("acceptance_length")), fmt(macro.get("verify_rate"))]
        + [""] * k_max
        + [fmt(macro.get("speedup"))]
    )
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
