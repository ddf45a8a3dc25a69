"""Load a resolved target directory's model and tokenizer, with one-line errors.

``transformers`` reports a directory it cannot load with long multi-line messages; these
wrappers keep the first line, name the directory and say what to do.
"""

from __future__ import annotations

import os
from typing import Any

from deepspec.errors import TargetError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_target_model(model_dir: str | os.PathLike[str], dtype: Any = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)`` in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise TargetError(
            f"cannot load the target model in {os.fspath(model_dir)} ({type(exc).__name__}: "
            f"{_first_line(exc)}); pass a complete HF model directory (config.json + safetensors)"
        ) from None
    return model.eval()


def load_target_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(model_dir)``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(model_dir))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise TargetError(
            f"cannot load the tokenizer of target {os.fspath(model_dir)} ({type(exc).__name__}: "
            f"{_first_line(exc)}); pass a model directory with its tokenizer files"
        ) from None
