"""Draft utilities from the command line.

python -m deepspec.drafts convert SRC DST   # any draft deepspec reads -> deepspec's own format
python -m deepspec.drafts show SRC          # its algorithm, sizes and where it came from

SRC is a checkpoint directory (deepspec's or the DeepSpec reference's released layout) or
a hub id such as ``deepseek-ai/dspark_qwen3_4b_block7``. Converting is never needed to
evaluate, export or fine-tune a draft; it writes a checkpoint that records its weights'
checksum (DST: new, empty or an earlier draft checkpoint, replaced atomically).
"""

from __future__ import annotations

import json

from deepspec.cli import ArgumentParser, run_main
from deepspec.drafts.checkpoint import load_draft, read_draft_config, resolve_draft
from deepspec.drafts.saving import save_draft


def main() -> int:
    parser = ArgumentParser(prog="python -m deepspec.drafts", description="Draft checkpoint utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write a draft in deepspec's own checkpoint format")
    convert.add_argument("src", help="draft directory (deepspec or DeepSpec reference format) or hub id")
    convert.add_argument("dst", help="output directory: new, empty or an earlier draft checkpoint")
    show = sub.add_parser("show", help="print a draft's config as deepspec reads it")
    show.add_argument("src", help="draft directory (deepspec or DeepSpec reference format) or hub id")
    args = parser.parse_args()
    src = resolve_draft(args.src)
    if args.command == "show":
        arch, config = read_draft_config(src)
        print(json.dumps(config.to_json(arch), indent=2))
        return 0
    save_draft(load_draft(src), args.dst)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    run_main(main)
