"""DSpark on Qwen/Qwen3-4B (36 layers), the reference training setting.

config/dspark/base.py with the qwen3_4b row of config/targets.py (target, five layer ids, mask token,
torch_compile), as the loader reads _base_ and _target_ (deepspec/config/loader.py).
"""

_base_ = "base.py"
_target_ = "qwen3_4b"
exp_name = "dspark_block7_qwen3_4b"
