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
"""

from __future__ import annotations

import argparse
import json
import os

from deepspec.cli import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    return parser.parse_args(argv)


def main() -> int:
    from deepspec.data.splits import first_user_turn, load_rows, normalize_rows, split_conversations
    from deepspec.errors import DataError
    from deepspec.utils.io import atomic_open

    args = parse_args()
    name = args.name or os.path.splitext(os.path.basename(args.input[0].rstrip("/")))[0].replace("/", "_")
    out_dir = args.output_dir or os.path.join("data", name)
    train_path = os.path.join(out_dir, "train.jsonl")
    eval_path = os.path.join(args.eval_dir, f"{name}.jsonl") if args.test_size > 0 else None
    outputs = [p for p in (train_path, eval_path) if p]
    existing = [p for p in outputs if os.path.exists(p)]
    if args.skip_existing and len(existing) == len(outputs):
        print(f"skip: {', '.join(outputs)} exist (--skip-existing)")
        return 0
    if existing and not args.overwrite:
        raise DataError(f"{existing[0]} exists; pass --overwrite to replace it or --skip-existing to keep it")

    rows = (row for source in args.input for row in load_rows(source, split=args.split, subset=args.subset))
    conversations, skipped = normalize_rows(rows, name, max_rows=args.max_rows)
    sources = " + ".join(args.input)
    if not conversations:
        raise DataError(f"{sources}: no usable rows ({skipped or 'empty'})")
    train, heldout = split_conversations(conversations, test_size=args.test_size, seed=args.seed)
    with atomic_open(train_path, "w", encoding="utf-8") as fh:
        for conv in train:
            fh.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
    if eval_path:
        with atomic_open(eval_path, "w", encoding="utf-8") as fh:
            for conv in heldout:
                fh.write(
                    json.dumps({"id": conv.id, "turns": [first_user_turn(conv)]}, ensure_ascii=False) + "\n"
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
