"""Regenerate the assistant turns of a conversation JSONL with the target model.

Talks to any OpenAI-compatible server through the ``openai`` client (start servers with
scripts/data/launch_server.sh). Output rows are conversations in deepspec's JSONL format;
rows that fail after the retries go to ``<output stem>_error.jsonl`` with the reason.
A killed run continues with ``--resume`` (rows are matched by id; none is written twice).

CPU (llama.cpp serving the embedded SmolLM2 GGUF on port 30000)::

    bash scripts/data/launch_server.sh --engine llamacpp --num-workers 1 --base-port 30000
    python scripts/data/generate_train_data.py --server-address 127.0.0.1:30000 \\
        --input-file-path data/train_prompts/mini.jsonl \\
        --output-file-path outputs/data/mini_regen.jsonl --max-tokens 512 --concurrency 2

GPUs (8 SGLang workers of one node, one per GPU; spread the load over all of them)::

    bash scripts/data/launch_server.sh --engine sglang --model Qwen/Qwen3-4B --num-workers 8
    python scripts/data/generate_train_data.py --model Qwen/Qwen3-4B --disable-thinking \\
        --server-address 127.0.0.1:30000 127.0.0.1:30001 ... 127.0.0.1:30007 \\
        --concurrency 512 --input-file-path data/train_prompts/mixed_train_000.jsonl \\
        --output-file-path data/regen/qwen3_4b_000.jsonl

Several nodes: launch workers on each node and list every ``host:port`` in
``--server-address`` (one generator process drives them all).

Before anything is written every server must answer ``GET /v1/models``: with ``--model``
each must list that model, without it all must serve the same one. Rows record the model
name (a local GGUF path is recorded as its file name). No API key is sent unless
``--api-key-env NAME`` names the environment variable holding one. ``--overwrite`` writes
to ``<output>.partial`` and replaces the previous output only when the run completes.

No server at all (slow; batched transformers ``generate`` on this machine)::

    python scripts/data/generate_train_data.py --engine hf --model embedded:smollm2-135m-instruct \\
        --input-file-path data/train_prompts/mini.jsonl --output-file-path out.jsonl --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import sys

from deepspec.cli import ArgumentParser, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine", choices=("openai", "hf"), default="openai", help="server client or local HF"
    )
    parser.add_argument(
        "--model",
        help="model name sent to the server (default: the first one it lists); target for --engine hf",
    )
    parser.add_argument("--server-address", nargs="+", default=[], help="HOST:PORT of each server")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="send the API key held in environment variable NAME (default: no key is sent)",
    )
    parser.add_argument("--input-file-path", required=True)
    parser.add_argument("--output-file-path", required=True)
    parser.add_argument("--error-file-path", help="default: <output stem>_error.jsonl")
    parser.add_argument("--concurrency", type=int, default=64, help="rows in flight")
    parser.add_argument("--num-samples", type=int, default=1, help="answers per input row (ids <id>#<k>)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--max-tokens", type=int, default=4096, help="per generated turn")
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=None)
    thinking.add_argument("--disable-thinking", dest="enable_thinking", action="store_false")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--retry-backoff", type=float, default=1.0, help="seconds before the first retry")
    parser.add_argument(
        "--max-consecutive-failures", type=int, default=100, help="stop when this many rows fail in a row"
    )
    parser.add_argument("--resume", action="store_true", help="skip ids already in the output / error file")
    parser.add_argument(
        "--retry-errors", action="store_true", help="with --resume: retry the error file's rows"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over; the previous output and error files are replaced when the new run completes",
    )
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip (and count) malformed input rows instead of stopping",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="--engine hf: prompts per generate call")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="--engine hf: model dtype")
    parser.add_argument("--seed", type=int, default=0, help="--engine hf: sampling seed")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--count-pending",
        action="store_true",
        help="print how many rows a --resume run would still request, and exit (no server needed)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every numeric argument finite and in range (one error line naming it)."""
    from deepspec.errors import check_number

    big = 1_000_000
    checks = [
        ("concurrency", 1, big, False),
        ("num_samples", 1, big, False),
        ("max_tokens", 1, None, False),
        ("batch_size", 1, big, False),
        ("temperature", 0, None, False),
        ("top_p", 0, 1, True),
        ("top_k", -1, None, False),
        ("min_p", 0, 1, False),
        ("repetition_penalty", 0, None, True),
        ("timeout", 0, None, True),
        ("max_retries", 0, 1000, False),
        ("retry_backoff", 0, 3600, False),
        ("max_consecutive_failures", 1, None, False),
        ("seed", 0, None, False),
    ]
    for name, low, high, low_open in checks:
        value = getattr(args, name)
        if value is not None:
            check_number(f"--{name.replace('_', '-')}", value, low=low, high=high, low_open=low_open)


def main() -> int:
    from deepspec.data.generation_backends import HFBackend, OpenAIBackend, SamplingParams, parse_address
    from deepspec.data.regenerate import (
        RegenOptions,
        check_paths,
        count_pending,
        load_input,
        run_regeneration,
    )
    from deepspec.errors import ConfigError, DataError

    args = parse_args()
    check_args(args)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
        enable_thinking=args.enable_thinking,
    )
    options = RegenOptions(
        input_path=args.input_file_path,
        output_path=args.output_file_path,
        error_path=args.error_file_path,
        num_samples=args.num_samples,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        retry_backoff=args.retry_backoff,
        resume=args.resume,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        max_consecutive_failures=args.max_consecutive_failures,
        progress=not args.no_progress,
        skip_bad_rows=args.skip_bad_rows,
    )
    if args.count_pending:
        print(count_pending(options))
        return 0
    api_key = None
    if args.engine == "hf":
        if not args.model:
            raise DataError("--engine hf needs --model (a target name or directory)")
    else:
        if not args.server_address:
            raise DataError("no --server-address given (HOST:PORT of each server; see --help)")
        for address in args.server_address:
            parse_address(address)  # a typo stops here, before any file is read or written
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise ConfigError(
                    f"--api-key-env {args.api_key_env}: that environment variable is not set or empty; "
                    f"export {args.api_key_env}=<key> or leave --api-key-env out"
                )
    # nothing is written before the paths and the input are known to be good ...
    check_paths(options)
    prepared = load_input(options)
    if prepared[1].skipped:
        print(f"note: {options.input_path}: {prepared[1].summary()} (--skip-bad-rows)", flush=True)
    if args.engine == "hf":
        backend = HFBackend(args.model, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed)
    else:
        backend = OpenAIBackend(args.server_address, args.model, timeout=args.timeout, api_key=api_key)
    # ... and every server answered (inside run_regeneration, before the first write)
    summary = run_regeneration(backend, options, params, prepared)
    print(summary.line(), flush=True)
    if not summary.committed:
        out_partial, err_partial = options.write_paths()
        print(f"partial output: {out_partial}; errors: {err_partial}")
        raise DataError(
            f"{summary.aborted}; the previous {summary.output_path} is unchanged; fix the servers and rerun "
            "with --overwrite --resume --retry-errors to continue this run"
        )
    print(f"output: {summary.output_path}" + (f"; errors: {summary.error_path}" if summary.failed else ""))
    if summary.aborted:
        raise DataError(f"{summary.aborted}; fix the servers and rerun with --resume --retry-errors")
    if summary.failed:
        print(
            f"error: {summary.failed} of {summary.total} rows failed (first: {summary.first_error}); "
            f"they are in {summary.error_path}; rerun with --resume --retry-errors",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
