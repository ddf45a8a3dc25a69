"""Turn a prompt dataset into a training conversation file and a held-out eval task.

Reads a local JSONL / JSON / Parquet file, a ``datasets.save_to_disk`` directory or a hub
dataset name; normalises the rows to conversations; splits off ``--test-size`` rows with
``--seed``; writes ``<output-dir>/train.jsonl`` and the held-out first user turns as
``<eval-dir>/<name>.jsonl`` (``{"turns": [...]}`` rows, read by eval.py).

This stage runs on one CPU process (no GPU, no distribution needed), e.g.::

    python scripts/data/download_and_split.py --input data/train_prompts/mini.jsonl \\
        --name mini --test-size 0.1 --output-dir outputs/data/mini --eval-dir outputs/data/mini/eval

    python scripts/data/download_and_split.py --input HuggingFaceH4/ultrachat_200k \\
        --split train_sft --name ultrachat --test-size 500 --output-dir data/ultrachat

On a cluster run it once (on any node) and put the outputs on shared storage.

Outputs are written atomically (a temporary file renamed over the old one once both are
complete), must not be one of the inputs, and are replaced only with ``--overwrite``.
JSONL lines that are not JSON stop the run unless ``--skip-bad-rows`` (skipped, counted).
"""

from __future__ import annotations

import argparse
import json
import os

from deepspec.cli import ArgumentParser, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, nargs="+", help="file(s), save_to_disk directory or hub dataset name"
    )
    parser.add_argument("--name", help="dataset name for ids and the eval file (default: input file stem)")
    parser.add_argument("--split", default="train", help="split of a hub / saved dataset")
    parser.add_argument("--subset", help="hub dataset configuration")
    parser.add_argument("--test-size", type=float, default=0.0, help="held-out rows: fraction (<1) or count")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-rows", type=int, help="use only the first N usable rows")
    parser.add_argument("--output-dir", help="where train.jsonl goes (default: data/<name>)")
    parser.add_argument("--eval-dir", default="eval_datasets", help="where <name>.jsonl (held-out) goes")
    parser.add_argument("--skip-existing", action="store_true", help="do nothing when the outputs exist")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip (and count) JSONL lines that are not JSON"
    )
    return parser.parse_args(argv)


def main() -> int:
    from deepspec.data.splits import first_user_turn, load_rows, normalize_rows, split_conversations
    from deepspec.errors import ConfigError, DataError, check_number
    from deepspec.utils.io import atomic_open, check_writable_dir, same_file

    args = parse_args()
    check_number("--test-size", args.test_size, low=0)
    if args.test_size >= 1 and args.test_size != int(args.test_size):
        raise ConfigError(f"--test-size must be a fraction below 1 or a whole count, got {args.test_size:g}")
    if args.max_rows is not None:
        check_number("--max-rows", args.max_rows, low=1)
    check_number("--seed", args.seed, low=0)
    name = args.name or os.path.splitext(os.path.basename(args.input[0].rstrip("/")))[0].replace("/", "_")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"--name {name!r} must be a plain file name (no '/'); pass --name NAME")
    out_dir = args.output_dir or os.path.join("data", name)
    train_path = os.path.join(out_dir, "train.jsonl")
    eval_path = os.path.join(args.eval_dir, f"{name}.jsonl") if args.test_size > 0 else None
    outputs = [p for p in (train_path, eval_path) if p]
    if eval_path and same_file(train_path, eval_path):
        raise DataError(
            f"the held-out file {eval_path} is the train file; choose another --eval-dir or --name"
        )
    for source in args.input:
        for out, flag in ((train_path, "--output-dir"), (eval_path, "--eval-dir")):
            if (
                out
                and os.path.exists(os.path.expanduser(source))
                and same_file(out, os.path.expanduser(source))
            ):
                raise DataError(
                    f"{flag}: the output {out} is the input {source}; writing it would destroy the input; "
                    f"choose another {flag}"
                )
    existing = [p for p in outputs if os.path.exists(p)]
    if args.skip_existing and len(existing) == len(outputs):
        print(f"skip: {', '.join(outputs)} exist (--skip-existing)")
        return 0
    if existing and not args.overwrite:
        raise DataError(f"{existing[0]} exists; pass --overwrite to replace it or --skip-existing to keep it")
    for path, flag in ((train_path, "--output-dir"), (eval_path, "--eval-dir")):
        if not path:
            continue
        if os.path.isdir(path):
            raise DataError(f"{flag}: {path} is a directory; remove it or choose another {flag}")
        check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)

    bad: dict[str, int] = {}
    rows = (
        row
        for source in args.input
        for row in load_rows(
            source, split=args.split, subset=args.subset, skip_bad=args.skip_bad_rows, skipped=bad
        )
    )
    conversations, skipped = normalize_rows(rows, name, max_rows=args.max_rows)
    for reason, count in bad.items():
        skipped[reason] = skipped.get(reason, 0) + count
    sources = " + ".join(args.input)
    if not conversations:
        raise DataError(f"{sources}: no usable rows ({skipped or 'empty'}); check --input")
    train, heldout = split_conversations(conversations, test_size=args.test_size, seed=args.seed)
    # both files are complete on disk before either replaces an old one
    with atomic_open(train_path, "w", encoding="utf-8") as train_fh:
        for conv in train:
            train_fh.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
        train_fh.flush()
        os.fsync(train_fh.fileno())  # a full disk fails here, before the held-out file is replaced
        if eval_path:
            with atomic_open(eval_path, "w", encoding="utf-8") as fh:
                for conv in heldout:
                    fh.write(
                        json.dumps({"id": conv.id, "turns": [first_user_turn(conv)]}, ensure_ascii=False)
                        + "\n"
                    )
    print(
        f"{sources}: {len(conversations)} conversations ({sum(skipped.values())} rows skipped: {skipped or 'none'})"
    )
    print(f"train: {len(train)} -> {train_path}")
    if eval_path:
        print(f"held-out: {len(heldout)} first user turns -> {eval_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
