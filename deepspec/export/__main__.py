"""``python -m deepspec.export <draft dir> --to {llamacpp,vllm,sglang,speculators,deepspec-reference} --out <dir>``"""

from __future__ import annotations

import json

from deepspec.cli import ArgumentParser, run_main
from deepspec.export import FORMATS, OUTTYPES, export_draft


def main() -> int:
    parser = ArgumentParser(
        prog="python -m deepspec.export",
        description="Write a trained draft in a serving engine's format (see README, Serving).",
    )
    parser.add_argument(
        "draft",
        help="draft checkpoint directory (e.g. <checkpoints>/step_latest, or a DeepSpec reference "
        "draft), or a hub id such as deepseek-ai/dspark_qwen3_4b_block7",
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="target engine format; deepspec-reference = the DeepSpec reference code's own layout",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or an earlier export (replaced atomically); anything else, "
        "and a directory holding the draft, the target or the working directory, is refused",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="the target's HF directory or hub name: llamacpp reads its tokenizer and embeddings, "
        "speculators records it as the verifier (default: the draft's target)",
    )
    parser.add_argument(
        "--outtype", default=None, choices=OUTTYPES, help="llamacpp only: GGUF weight type (default f32)"
    )
    parser.add_argument(
        "--allow-other-target",
        action="store_true",
        help="export against a --target other than the one the draft was trained for (refused by default)",
    )
    parser.add_argument(
        "--mask-host-id",
        type=int,
        default=None,
        help="target token id whose embedding row carries a learned mask vector (default: the "
        "highest id outside a pruned draft vocabulary, else the last id)",
    )
    args = parser.parse_args()
    manifest = export_draft(
        args.draft,
        args.to,
        args.out,
        target_dir=args.target,
        outtype=args.outtype,
        mask_host_id=args.mask_host_id,
        allow_other_target=args.allow_other_target,
    )
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
