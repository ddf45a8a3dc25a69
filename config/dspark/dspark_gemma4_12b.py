"""DSpark on google/gemma-4-12B-it (48 layers), the reference training setting.

config/dspark/base.py with the gemma4_12b row of config/targets.py (target, five layer ids, mask token,
torch_compile), as the loader reads _base_ and _target_ (deepspec/config/loader.py).
"""

_base_ = "base.py"
_target_ = "gemma4_12b"
exp_name = "dspark_block7_gemma4_12b"
