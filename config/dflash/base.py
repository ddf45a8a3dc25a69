"""DFlash, the reference training setting (docs/DESIGN.md §2), for any row of config/targets.py.

DFlash: parallel block drafter, CE loss only. ``algorithm = "dflash"`` applies the
algorithm's defaults (deepspec/config/schema.py, ALGORITHM_DEFAULTS: no Markov head, no
confidence head, loss weights CE 1.0 / TV 0); everything else is the DSpark reference
setting the schema defaults hold (block 7, five draft layers, 512 anchors, position decay
4, lr 6e-4, global batch 512, 4096 tokens, 10 epochs, bf16). So this base only names the
algorithm: it writes down what differs from the defaults and nothing else.

The per-target files build on it (``_base_ = "base.py"`` plus ``_target_``, which brings the
target, its layer ids, mask token and train.torch_compile from config/targets.py), and so
does the SmolLM2 CPU recipe: a change for every DFlash run is made once, here. Train with a
per-target file: this one alone trains the schema's target, Qwen/Qwen3-4B, without its mask
token id and under the derived exp_name ``dflash_Qwen3-4B``.
"""

algorithm = "dflash"
