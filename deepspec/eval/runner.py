"""Evaluation driver: benchmarks → speculative decoding (+ the plain baseline) → metrics,
``results.json``, ``samples.jsonl``, plots and a printed table.

Timing: at batch size 1 each prompt is decoded speculatively and then by the target alone,
prompt after prompt, in the same process with the same limits; with ``--batch-size`` B > 1
all prompts of a dataset are decoded speculatively (continuous batching, B rows) and then
plainly at the same batch size. One short warm-up generation per dataset is not timed.
``speedup`` = speculative tokens/s ÷ plain tokens/s over the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from deepspec.data.chat import ChatTokenizer
from deepspec.data.eval_prompts import DEFAULT_EVAL_TASKS, load_eval_prompts
from deepspec.data.fingerprint import target_fingerprint
from deepspec.drafts import load_draft, read_draft_config
from deepspec.drafts.checkpoint import draft_fingerprint, read_calibration, resolve_draft
from deepspec.errors import ConfigError, DataError
from deepspec.eval.batch_decode import plain_generate_batch, speculative_generate_batch
from deepspec.eval.decode import DecodeResult, plain_generate, speculative_generate
from deepspec.eval.metrics import acceptance_stats, calibration_stats, macro_average, threshold_sweep
from deepspec.eval.ragged_target import RaggedTarget
from deepspec.eval.settings import (  # noqa: F401 - re-exported: the runner's public names
    BASELINE_KEYS,
    RESULTS_NAME,
    SAMPLES_NAME,
    EvalSettings,
    check_draft_supports_policy,
    check_output_dir,
    load_baseline,
    resolve_settings,
)
from deepspec.eval.target import HFTarget
from deepspec.targets.family import load_family_spec
from deepspec.targets.load import load_target_model, load_target_tokenizer
from deepspec.utils.distributed import spawn
from deepspec.utils.io import atomic_open, atomic_write_json

MACRO_KEYS = ("acceptance_length", "speedup", "verify_rate", "draft_tokens_per_proposal")


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
    """Holds the target, tokenizer and draft of one worker and decodes prompts."""

    def __init__(
        self, target_dir: str, draft, settings: EvalSettings, policy: Any, device: str = "cpu"
    ) -> None:
        self.settings = settings
        spec = load_family_spec(target_dir)
        check_draft_matches_target(draft, spec, target_dir)
        dtype = torch.bfloat16 if settings.dtype == "bf16" else torch.float32
        model = load_target_model(target_dir, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.target = HFTarget(model, draft.config.target_layer_ids)
        self.draft = draft.to(device=device, dtype=dtype).eval()
        self.chat = ChatTokenizer(load_target_tokenizer(target_dir), enable_thinking=False)
        eos = set(spec.eos_token_ids)
        if self.chat.tokenizer.eos_token_id is not None:
            eos.add(int(self.chat.tokenizer.eos_token_id))
        self.eos_ids = eos
        self.reused: dict[tuple[str, int], dict] = {}
        self.policy = policy  # deepspec.eval.policies.VerifyPolicy, built once by the plan

    def _generate(
        self, prompt_ids: list[int], seed: int, max_new: int, plain: bool = True
    ) -> tuple[DecodeResult, DecodeResult | None]:
        s = self.settings
        common = dict(max_new_tokens=max_new, temperature=s.temperature, eos_ids=self.eos_ids)
        spec = speculative_generate(
            self.target,
            self.draft,
            prompt_ids,
            **common,
            generator=torch.Generator(self.device).manual_seed(seed),
            policy=self.policy,
        )
        base = None
        if s.baseline and plain:
            base = plain_generate(
                self.target, prompt_ids, **common, generator=torch.Generator(self.device).manual_seed(seed)
            )
        return spec, base

    def _generate_batch(
        self, prompts: list[list[int]], seed: int, max_new: int, plain: list[bool], bar=None
    ) -> tuple[list[DecodeResult], list[DecodeResult | None]]:
        """Continuous batching of ``prompts``; the baseline (where ``plain``) decodes the
        same prompts at the same batch size."""
        s = self.settings
        rows = min(s.batch_size, len(prompts))
        common = dict(max_new_tokens=max_new, temperature=s.temperature, eos_ids=self.eos_ids)
        model = self.target.model
        spec = speculative_generate_batch(
            RaggedTarget(model, self.draft.config.target_layer_ids, rows),
            self.draft,
            prompts,
            **common,
            generator=torch.Generator(self.device).manual_seed(seed),
            policy=self.policy,
            progress=None if bar is None else lambda result: bar.update(1),
        ).results
        base: list[DecodeResult | None] = [None] * len(prompts)
        todo = [i for i, p in enumerate(plain) if p]
        if s.baseline and todo:
            done = plain_generate_batch(
                RaggedTarget(model, [], min(rows, len(todo))),
                [prompts[i] for i in todo],
                **common,
                generator=torch.Generator(self.device).manual_seed(seed),
            ).results
            for i, result in zip(todo, done, strict=True):
                base[i] = result
        return spec, base

    def records(self, task: str, prompts: list, desc: str) -> list[dict[str, Any]]:
        """Decode ``prompts`` (speculative, then plain) → one record per prompt."""
        s = self.settings
        out: list[dict[str, Any]] = []
        if not prompts:
            return out
        encoded = [self.chat.prompt_ids([{"role": "user", "content": p.text}]) for p in prompts]
        olds = []
        for prompt, ids in zip(prompts, encoded, strict=True):
            old = self.reused.get((task, prompt.index))
            if self.reused and (old is None or old["prompt_token_ids"] != ids):
                raise DataError(
                    f"--baseline-from {s.baseline_from} has no record of {task} prompt {prompt.index} "
                    "with these token ids; evaluate the same tasks and --max-samples there"
                )
            olds.append(old)
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not s.progress)
        if s.batch_size > 1:
            warm = encoded[: s.batch_size]
            self._generate_batch(warm, s.seed, min(8, s.max_new_tokens), [not self.reused] * len(warm))
            specs, bases = self._generate_batch(
                encoded, s.seed, s.max_new_tokens, [old is None for old in olds], bar
            )
        else:
            self._generate(encoded[0], s.seed, min(8, s.max_new_tokens), plain=not self.reused)  # warm-up
            specs, bases = [], []
            rounds = accepted = 0
            for prompt, ids, old in zip(prompts, encoded, olds, strict=True):
                spec, base = self._generate(ids, s.seed + prompt.index, s.max_new_tokens, plain=old is None)
                specs.append(spec)
                bases.append(base)
                rounds += len(spec.accepted)
                accepted += sum(spec.accepted)
                bar.update(1)
                bar.set_postfix(tau=f"{(accepted + rounds) / max(1, rounds):.2f}")
        bar.close()
        for prompt, ids, old, spec, base in zip(prompts, encoded, olds, specs, bases, strict=True):
            record = {
                "dataset": task,
                "index": prompt.index,
                "prompt_token_ids": ids,
                "output_token_ids": spec.output_ids,
                "accepted_per_round": spec.accepted,
                "proposed_per_round": spec.proposed,
                "confidence_per_round": spec.confidences,
                "seconds": spec.seconds,
                "target_seconds": spec.target_seconds,
                "draft_seconds": spec.draft_seconds,
            }
            if base is not None:
                record["baseline_output_token_ids"] = base.output_ids
                record["baseline_seconds"] = base.seconds
            elif old is not None:
                record["baseline_output_token_ids"] = old["baseline_output_token_ids"]
                record["baseline_seconds"] = old["baseline_seconds"]
            out.append(record)
        return out


def task_metrics(task: str, records: list[dict[str, Any]], settings: EvalSettings) -> dict[str, Any]:
    """Per-dataset metrics from its prompt records (see the module docstring)."""
    proposed = [k for r in records for k in r["proposed_per_round"]]
    accepted = [m for r in records for m in r["accepted_per_round"]]
    out: dict[str, Any] = {"dataset": task, "num_prompts": len(records)}
    out.update(acceptance_stats(proposed, accepted).to_dict())
    out["output_tokens"] = sum(len(r["output_token_ids"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    out["tokens_per_second"] = out["output_tokens"] / max(seconds, 1e-9)
    # time in neither model: sampling, verification, cache bookkeeping (the loop's overhead)
    out["draft_time_share"] = sum(r.get("draft_seconds", 0) for r in records) / max(seconds, 1e-9)
    out["loop_overhead_share"] = (
        1 - out["draft_time_share"] - sum(r.get("target_seconds", 0) for r in records) / max(seconds, 1e-9)
    )
    if settings.baseline:
        base_tokens = sum(len(r["baseline_output_token_ids"]) for r in records)
        out["baseline_tokens_per_second"] = base_tokens / max(
            sum(r["baseline_seconds"] for r in records), 1e-9
        )
        out["speedup"] = out["tokens_per_second"] / out["baseline_tokens_per_second"]
        if settings.temperature == 0:
            same = sum(r["output_token_ids"] == r["baseline_output_token_ids"] for r in records)
            out["greedy_match_rate"] = same / max(1, len(records))
    conf = [c for r in records for c in r["confidence_per_round"]]
    if conf and len(conf) == len(proposed):
        cut = [c[:k] for c, k in zip(conf, proposed)]  # positions that were verified
        out["calibration"] = [c.to_dict() for c in calibration_stats(cut, proposed, accepted)]
        if settings.policy == "fixed":  # the sweep needs untruncated proposals
            out["threshold_sweep"] = threshold_sweep(cut, proposed, accepted).to_dict()  # per slot
            out["cumulative_sweep"] = threshold_sweep(cut, proposed, accepted, rule="cumulative").to_dict()
    return out


def _task_prompts(settings: EvalSettings) -> dict[str, list]:
    return {
        task: load_eval_prompts(
            task,
            settings.eval_datasets_dir,
            max_samples=settings.max_samples or DEFAULT_EVAL_TASKS.get(task),
            seed=settings.seed,
            split=settings.split,
        )
        for task in settings.tasks
    }


@dataclass
class EvalPlan:
    """Everything an evaluation reads before decoding, read once (:func:`plan_evaluation`)
    and handed to every worker: the resolved settings, the prompts of each task, the
    verification policy (its SPS table loaded), the reused baseline records and what
    identifies the draft in the results."""

    settings: EvalSettings
    draft_path: str  # a local checkpoint directory (a hub id already resolved)
    target_name: str
    prompts: dict[str, list]
    policy: Any  # deepspec.eval.policies.VerifyPolicy
    reused: dict | None
    draft_identity: dict[str, Any]


def plan_evaluation(draft_path: str, settings: EvalSettings, target_name: str) -> EvalPlan:
    """The plan of an evaluation; every one-line refusal that needs no model (a malformed
    prompt file, an impossible split, an SPS table, a missing draft or one whose heads cannot
    run the policy, the output directory, a mismatched ``--baseline-from``) happens here.
    ``draft_path``: a checkpoint directory or a hub id (resolved here)."""
    asked = settings.policy  # the refusal names the flag the user gave ("auto": a threshold flag)
    s = resolve_settings(settings)
    prompts = _task_prompts(s)  # the user's own files first: prompts, then the SPS table
    policy = s.verify_policy()
    draft_path = resolve_draft(draft_path)  # a hub id: downloaded once
    path = os.path.expanduser(draft_path)
    _, config = read_draft_config(path)
    check_draft_supports_policy(asked, path, config, s.confidence_threshold, s.survival_threshold)
    if s.output_dir:
        check_output_dir(s.output_dir)
    reused = load_baseline(s.baseline_from, s, target_name) if s.baseline and s.baseline_from else None
    identity = {
        "draft_algorithm": config.algorithm,
        "draft_checksum": draft_fingerprint(path),
        "confidence_temperatures": read_calibration(path),
    }
    return EvalPlan(s, draft_path, target_name, prompts, policy, reused, identity)


def _worker_records(
    target_dir: str, plan: EvalPlan, worker: int, workers: int, device: str, draft=None
) -> dict[str, list[dict[str, Any]]]:
    draft = draft if draft is not None else load_draft(plan.draft_path)
    evaluator = Evaluator(target_dir, draft, plan.settings, plan.policy, device=device)
    evaluator.reused = plan.reused or {}
    out = {}
    for task, prompts in plan.prompts.items():
        desc = f"eval {task}" if workers == 1 else f"eval {task} [{worker}]"
        out[task] = evaluator.records(task, prompts[worker::workers], desc)
    return out


def _spawned_worker(target_dir: str, plan: EvalPlan, workers: int, result_dir: str) -> None:
    """One worker process (:func:`deepspec.utils.distributed.spawn`): its share of the prompts,
    written to ``result_dir/worker<i>.json``."""
    worker = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = f"cuda:{worker}"
    else:  # CPU workers (tests): share the cores
        device = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    records = _worker_records(target_dir, plan, worker, workers, device)
    atomic_write_json(os.path.join(result_dir, f"worker{worker}.json"), records)


def _worker_count(num_workers: int | None) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_workers is None:
        return gpus or 1
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"--num-workers must be an integer >= 1, got {num_workers!r}")
    if gpus and num_workers > gpus:
        raise ConfigError(
            f"--num-workers {num_workers} exceeds the {gpus} visible GPUs (one worker per GPU); "
            f"pass at most {gpus} or set CUDA_VISIBLE_DEVICES"
        )
    return num_workers


def evaluate(
    target_dir: str,
    draft_path: str,
    settings: EvalSettings,
    *,
    target_name: str = "",
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate a draft checkpoint on ``settings.tasks`` (:func:`plan_evaluation`, then
    :func:`run_plan`)."""
    plan = plan_evaluation(draft_path, settings, target_name or target_dir)
    return run_plan(target_dir, plan, num_workers=num_workers)


def run_plan(
    target_dir: str, plan: EvalPlan, *, draft=None, num_workers: int | None = None
) -> dict[str, Any]:
    """Decode ``plan``: one worker per visible GPU (prompts split round-robin), else one CPU
    worker, which uses ``draft`` when given (loaded once by the caller). Writes outputs when
    ``output_dir`` is set."""
    s = plan.settings
    workers = _worker_count(num_workers)
    start = time.perf_counter()
    if workers == 1:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        per_worker = [_worker_records(target_dir, plan, 0, 1, device, draft)]
    else:
        with tempfile.TemporaryDirectory() as result_dir:
            spawn(_spawned_worker, workers, target_dir, plan, workers, result_dir)
            per_worker = []
            for w in range(workers):
                with open(os.path.join(result_dir, f"worker{w}.json"), encoding="utf-8") as fh:
                    per_worker.append(json.load(fh))
    by_task = {
        t: sorted((r for part in per_worker for r in part[t]), key=lambda r: r["index"]) for t in s.tasks
    }
    per_task = [task_metrics(t, by_task[t], s) for t in s.tasks]
    results = {
        "config": {
            **asdict(s),
            "target": plan.target_name,
            "draft": plan.draft_path,
            **plan.draft_identity,
            "target_fingerprint": target_fingerprint(target_dir),
            "workers": workers,
        },
        "datasets": per_task,
        "macro_average": macro_average(per_task, MACRO_KEYS),
        "seconds": time.perf_counter() - start,
    }
    if s.output_dir:
        write_outputs(results, by_task, os.path.expanduser(s.output_dir))
    return results


def write_outputs(results: dict[str, Any], by_task: dict[str, list[dict[str, Any]]], out_dir: str) -> None:
    """``samples.jsonl``, then ``results.json`` (recording the samples' SHA-256, so a reader can
    tell they belong together), then the plots; every file is written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_open(os.path.join(out_dir, SAMPLES_NAME), "w", encoding="utf-8") as fh:
        for rows in by_task.values():
            for r in rows:
                line = json.dumps(r) + "\n"
                fh.write(line)
                digest.update(line.encode("utf-8"))
    results["samples_sha256"] = digest.hexdigest()
    atomic_write_json(os.path.join(out_dir, RESULTS_NAME), results)
    write_plots(results, out_dir)


def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """Per-position conditional acceptance per dataset; reliability diagrams and threshold
    sweeps for drafts with a confidence head."""
    from deepspec.eval.plots import (  # matplotlib: only when plots are written
        plot_conditional_acceptance,
        plot_reliability,
        plot_threshold_sweep,
    )

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
