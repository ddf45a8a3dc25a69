"""DFlash on Qwen/Qwen3-14B (40 layers), the reference training setting.

config/dflash/base.py with the qwen3_14b row of config/targets.py (target, five layer ids, mask token,
torch_compile), as the loader reads _base_ and _target_ (deepspec/config/loader.py).
"""

_base_ = "base.py"
_target_ = "qwen3_14b"
exp_name = "dflash_block7_qwen3_14b"
