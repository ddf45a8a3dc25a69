"""Load exported drafts with speculators' own loader (run with the speculators venv's python).

    HF_HUB_OFFLINE=1 <venv>/bin/python tests/engines/speculators_load.py DIR [DIR ...]

Prints one JSON line per directory: the class speculators picked, the keys its load
reported as missing / unexpected, and the tensors whose loaded values differ from the file.
"""

import json
import os
import sys
import warnings


def check(directory: str) -> dict:
    import torch
    from safetensors.torch import load_file
    from speculators import SpeculatorModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SpeculatorModel.from_pretrained(directory)
    state = model.state_dict()
    written = load_file(os.path.join(directory, "model.safetensors"))
    unexpected = sorted(k for k in written if k not in state)
    missing = sorted(k for k in state if k not in written and not k.startswith("verifier"))
    differ = sorted(
        k
        for k, v in written.items()
        if k in state and (state[k].shape != v.shape or not torch.equal(state[k].to(v.dtype), v))
    )
    return {
        "dir": directory,
        "class": type(model).__name__,
        "missing": missing,
        "unexpected": unexpected,
        "differ": differ,
        "loaded": len(written) - len(unexpected),
    }


if __name__ == "__main__":
    for d in sys.argv[1:]:
        print(json.dumps(check(d)), flush=True)
