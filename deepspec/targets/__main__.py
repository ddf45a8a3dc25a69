"""Target utilities from the command line.

python -m deepspec.targets resolve embedded:smollm2-135m-instruct   # prints the HF dir
python -m deepspec.targets spec Qwen/Qwen3-4B                        # prints the family spec
python -m deepspec.targets chat embedded:smollm2-135m-instruct "What is 7 * 6?"
python -m deepspec.targets llama-server                              # its binary, then its GGUF
"""

from __future__ import annotations

import argparse
import json
import time

from deepspec.cli import ArgumentParser, run_main
from deepspec.errors import ConfigError, TargetError, check_number
from deepspec.targets.family import load_family_spec
from deepspec.targets.load import load_target_model, load_target_tokenizer
from deepspec.targets.resolve import (
    DEFAULT_TARGET,
    EMBEDDED_PREFIX,
    embedded_bf16_gguf_path,
    llama_server_bin,
    resolve_target,
)


def chat(model_dir: str, prompt: str, *, max_new_tokens: int, dtype: str) -> str:
    """Greedy-answer one user prompt with the target's chat template; returns the reply."""
    import torch

    tokenizer = load_target_tokenizer(model_dir)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = load_target_model(model_dir, dtype=torch_dtype)
    try:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    except ValueError as exc:  # no chat template
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(
            f"the tokenizer of {model_dir} cannot format a chat ({first}); use a chat model"
        ) from None
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    print(f"[{len(new)} tokens in {seconds:.1f}s, {len(new) / max(seconds, 1e-9):.1f} tok/s]")
    return tokenizer.decode(new, skip_special_tokens=True)


def main() -> int:
    parser = ArgumentParser(
        prog="python -m deepspec.targets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_resolve = sub.add_parser("resolve", help="print the local HF directory of a target")
    p_resolve.add_argument("name", nargs="?", default=DEFAULT_TARGET)
    p_spec = sub.add_parser("spec", help="print the family spec a draft is built from")
    p_spec.add_argument("name", nargs="?", default=DEFAULT_TARGET)
    p_chat = sub.add_parser("chat", help="answer one prompt with the target (greedy)")
    p_chat.add_argument("name", nargs="?", default=DEFAULT_TARGET)
    p_chat.add_argument("prompt", nargs="?", default="In two sentences, what is speculative decoding?")
    p_chat.add_argument("--max-new-tokens", type=int, default=96)
    p_chat.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p_server = sub.add_parser(
        "llama-server", help="print where the native llama-server and its bf16 GGUF of a target are"
    )
    p_server.add_argument("name", nargs="?", default=DEFAULT_TARGET)
    args = parser.parse_args()
    if args.command == "llama-server":  # paths only: nothing is resolved or converted
        if not args.name.startswith(EMBEDDED_PREFIX):
            raise ConfigError(f"{args.name} is not an embedded target; pass a GGUF to llama-server directly")
        gguf = embedded_bf16_gguf_path(args.name.removeprefix(EMBEDDED_PREFIX))
        print(f"{llama_server_bin()}\n{gguf}")
        return 0
    if args.command == "chat":
        check_number("--max-new-tokens", args.max_new_tokens, low=1)
        if not args.prompt.strip():
            raise ConfigError("the chat prompt is empty; pass the text to answer")
    model_dir = resolve_target(args.name)
    if args.command == "resolve":
        print(model_dir)
    elif args.command == "spec":
        print(json.dumps(load_family_spec(model_dir).to_dict(), indent=2))
    else:
        print(f"target: {args.name} -> {model_dir}")
        print(f"user: {args.prompt}")
        reply = chat(model_dir, args.prompt, max_new_tokens=args.max_new_tokens, dtype=args.dtype)
        print(f"assistant: {reply}")
    return 0


if __name__ == "__main__":
    run_main(main)
