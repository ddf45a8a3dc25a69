"""Measured and simulated throughput of batched speculative decoding under the four
verification policies (fixed length, per-slot confidence threshold, cumulative-survival
threshold, DSpark's prefix scheduler), against plain batched decoding, at several batch sizes.

    python benchmarks/batched_policies.py --draft DRAFT [--batch-sizes 1,4,16] [--prompts 32]
        [--max-new-tokens 96] [--sps out/sps_cpu_r{rows}.json] [--calibration-run RUN]
        [--out out/batched_policies.json]

* Prompts: the first ``--prompts`` of gsm8k's report split; greedy, bf16, continuous
  batching (:mod:`deepspec.eval.batch_decode`); every method decodes the same prompts.
* ``--sps``: the SPS table per batch size (``{rows}`` is replaced by the batch size), from
  ``benchmarks/sps_profile.py --rows B``; the scheduler reads it, and so does the simulator.
* The ``threshold`` policy's ``t`` (cut at the first slot whose confidence is below it) and
  the ``cumulative`` policy's ``t`` (cut where the running product of the confidences falls
  below it) are each tuned per batch size with the simulator on the rounds of
  ``--calibration-run`` (an ``eval.py --split calibration`` run of the same draft), from
  0.01 to 0.95; without it, ``--confidence-threshold`` and ``--survival-threshold``.
* Prompts: ``max(--prompts, 4 B)`` so that most steps run with all ``B`` rows busy.
* Simulated: :func:`deepspec.eval.simulator.simulate` replays the rounds of the measured
  fixed-length run at that batch size (each request's drafts, calibrated confidences and
  accepted length) with nothing else from the runs: a step takes ``1 / SPS(B + verified)``
  of the same table (profiled with ``--draft``, so it includes the draft's time). It is
  compared with the measured throughput over the steady steps: all ``B`` rows decoding and
  no prompt prefilled in the step (the start and the draining tail excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import numpy as np
import torch


def _decode_steps(run, batch: int) -> tuple[float, int]:
    """(tokens/s over the steady steps, their number): all ``batch`` rows decoding, no prompt
    prefilled in the step."""
    full = [s for s in run.steps if s.requests == batch and not s.prefill]
    seconds = sum(s.seconds for s in full)
    return (sum(s.emitted for s in full) / seconds if seconds else float("nan")), len(full)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--sps", default="out/sps_cpu_r{rows}.json")
    parser.add_argument("--calibration-run", default=None)
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="threshold policy's t")
    parser.add_argument("--survival-threshold", type=float, default=0.5, help="cumulative policy's t")
    parser.add_argument("--out", default="out/batched_policies.json")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from deepspec.data.chat import ChatTokenizer
    from deepspec.data.eval_prompts import load_eval_prompts
    from deepspec.drafts import load_draft
    from deepspec.drafts.checkpoint import read_calibration
    from deepspec.eval.batch_decode import plain_generate_batch, speculative_generate_batch
    from deepspec.eval.policies import VerifyPolicy
    from deepspec.eval.ragged_target import RaggedTarget
    from deepspec.eval.scheduler import SPSTable
    from deepspec.eval.settings import read_eval_run
    from deepspec.eval.simulator import recorded_rounds, simulate
    from deepspec.targets import resolve_target
    from deepspec.targets.load import load_target_model, load_target_tokenizer

    target_dir = resolve_target(args.target)
    model = load_target_model(target_dir, dtype=torch.bfloat16).eval()
    draft = load_draft(args.draft, dtype=torch.bfloat16)
    layers = draft.config.target_layer_ids
    chat = ChatTokenizer(load_target_tokenizer(target_dir), enable_thinking=False)
    all_prompts = [
        chat.prompt_ids([{"role": "user", "content": p.text}])
        for p in load_eval_prompts("gsm8k", max_samples=max(args.prompts, 4 * max(batch_sizes)))
    ]
    eos = {int(chat.tokenizer.eos_token_id)}
    temps = read_calibration(args.draft)
    calibration_rounds = None
    if args.calibration_run:
        results, records = read_eval_run(args.calibration_run, "--calibration-run", "decode it again")
        decoded_with = results["config"].get("confidence_temperatures")
        calibration_rounds = recorded_rounds(records, decoded_with, temps)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, eos_ids=eos)
    speculative_generate_batch(RaggedTarget(model, layers, 2), draft, all_prompts[:2], **common)  # warm-up
    rows_out = []
    for batch in batch_sizes:
        sps = SPSTable.load(args.sps.format(rows=batch))
        prompts = all_prompts[: max(args.prompts, 4 * batch)]
        plain = plain_generate_batch(RaggedTarget(model, [], batch), prompts, **common)
        plain_tps = sum(len(r.output_ids) for r in plain.results) / plain.seconds
        plain_decode, _ = _decode_steps(plain, batch)
        rows_out.append(
            dict(batch=batch, method="plain", tokens_per_second=plain_tps, decode_tps=plain_decode)
        )
        print(f"B={batch:3d} plain      {plain_tps:7.1f} tok/s (decode steps {plain_decode:.1f})", flush=True)
        thresholds = {"threshold": args.confidence_threshold, "cumulative": args.survival_threshold}
        if calibration_rounds is not None:
            grid = np.array([0.01, 0.02, 0.03, 0.05, 0.075, *np.round(np.arange(0.1, 0.96, 0.05), 2)])
            for name in thresholds:
                scores = [
                    simulate(calibration_rounds, sps, batch=batch, policy=name, value=float(t), steps=400)
                    for t in grid
                ]
                thresholds[name] = float(grid[int(np.argmax([s.tokens_per_second for s in scores]))])
        fixed_rounds = None
        for policy in (
            VerifyPolicy(),
            VerifyPolicy("threshold", thresholds["threshold"]),
            VerifyPolicy("cumulative", thresholds["cumulative"]),
            VerifyPolicy("scheduled", sps=sps),
        ):
            run = speculative_generate_batch(
                RaggedTarget(model, layers, batch), draft, prompts, **common, policy=policy
            )
            results = run.results
            tokens = sum(len(r.output_ids) for r in results)
            rounds = sum(len(r.accepted) for r in results)
            tau = (sum(sum(r.accepted) for r in results) + rounds) / rounds
            verified = sum(sum(r.proposed) for r in results) / rounds
            decode_tps, full_steps = _decode_steps(run, batch)
            if policy.name == "fixed":
                records = [
                    {
                        "confidence_per_round": r.confidences,
                        "proposed_per_round": r.proposed,
                        "accepted_per_round": r.accepted,
                    }
                    for r in results
                ]
                fixed_rounds = recorded_rounds(records, temps, temps)
            full = [s for s in run.steps if s.requests == batch and not s.prefill]
            sim = simulate(fixed_rounds, sps, batch=batch, policy=policy.name, value=policy.value, steps=2000)
            row = dict(
                batch=batch,
                method=policy.name,
                value=policy.value,
                tokens_per_second=tokens / run.seconds,
                speedup=tokens / run.seconds / plain_tps,
                decode_tps=decode_tps,
                decode_speedup=decode_tps / plain_decode,
                full_batch_steps=full_steps,
                prompts=len(prompts),
                target_ms_per_step=1000 * statistics.fmean(s.target_seconds for s in full),
                other_ms_per_step=1000 * statistics.fmean(s.seconds - s.target_seconds for s in full),
                simulated_tps=sim.tokens_per_second,
                simulated_error=sim.tokens_per_second / decode_tps - 1,
                tau=tau,
                simulated_tau=sim.tokens_per_round,
                verified_per_round=verified,
                simulated_verified=sim.verified_per_round,
                greedy_match=all(
                    a.output_ids == b.output_ids for a, b in zip(results, plain.results, strict=True)
                ),
            )
            rows_out.append(row)
            print(
                f"B={batch:3d} {policy.describe():<28} {row['tokens_per_second']:7.1f} tok/s "
                f"x{row['speedup']:.2f}  decode {decode_tps:6.1f} (x{row['decode_speedup']:.2f}) "
                f"sim {sim.tokens_per_second:6.1f} ({100 * row['simulated_error']:+.1f}%)  tau {tau:.2f} "
                f"verified {verified:.2f}",
                flush=True,
            )
    out = {
        "target": args.target,
        "draft": args.draft,
        "confidence_temperatures": temps,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": platform.processor() or "cpu",
        "rows": rows_out,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
