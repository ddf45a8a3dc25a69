"""Eagle3, the reference training setting (docs/DESIGN.md §2), for any row of config/targets.py.

Eagle3: one autoregressive decoder layer trained with a 7-step training-time test (per-step
loss decay 0.8), reading three target layers. ``algorithm = "eagle3"`` applies the
algorithm's defaults (deepspec/config/schema.py, ALGORITHM_DEFAULTS: the block drafters'
Markov and confidence heads off); its own keys (draft_num_hidden_layers 1, ttt_length 7,
step_loss_decay 0.8) and the training setting (lr 6e-4, global batch 512, 4096 tokens, 10
epochs, bf16) are schema defaults. So this base only names the algorithm: it writes down
what differs from the defaults and nothing else.

The per-target files build on it (``_base_ = "base.py"`` plus ``_target_``, which brings the
target, its three layer ids and train.torch_compile from config/targets.py), and so does
the SmolLM2 CPU recipe: a change for every Eagle3 run is made once, here. Train with a
per-target file: this one alone trains the schema's target, Qwen/Qwen3-4B, with the block
drafters' five default layer ids and under the derived exp_name ``eagle3_Qwen3-4B``.
"""

algorithm = "eagle3"
