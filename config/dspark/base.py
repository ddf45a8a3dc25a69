"""DSpark, the reference training setting (docs/DESIGN.md §2), for any row of config/targets.py.

DSpark: DFlash backbone + vanilla Markov head (rank 256) + confidence head. Block 7, five
draft layers, 512 anchors per sequence, loss weights CE 0.1 / TV 0.9 / confidence 1.0 with
position decay 4; lr 6e-4, 4% warmup then cosine decay, a global batch of 512 sequences of
up to 4096 tokens, 10 epochs, bf16, DDP. All of that is the schema's defaults
(deepspec/config/schema.py), so this base only names the algorithm: it writes down what
differs from the defaults and nothing else.

The per-target files build on it (``_base_ = "base.py"`` plus ``_target_``, which brings the
target, its layer ids, mask token and train.torch_compile from config/targets.py), and so
does the SmolLM2 CPU recipe: a change for every DSpark run is made once, here. Train with a
per-target file: this one alone trains the schema's target, Qwen/Qwen3-4B, without its mask
token id and under the derived exp_name ``dspark_Qwen3-4B``.
"""

algorithm = "dspark"
