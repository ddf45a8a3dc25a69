"""DSpark on Qwen/Qwen3-4B (36 layers) — the reference training setting.

DSpark: DFlash backbone + vanilla Markov head (rank 256) + confidence head.
Five target layers spread over the stack, never the last one (its output is the
final hidden state, which the loss already uses).
"""

algorithm = "dspark"
project_name = "deepspec"
exp_name = "dspark_block7_qwen3_4b"
seed = 42

model = dict(
    target_model_name_or_path="Qwen/Qwen3-4B",
    target_layer_ids=[1, 9, 17, 25, 33],
    mask_token_id=151669,  # a spare id of the target's vocabulary
    block_size=7,
    num_draft_layers=5,
    num_anchors=512,
    markov_rank=256,
    markov_head_type="vanilla",
    confidence_head_alpha=1.0,
    confidence_head_with_markov=True,
    loss_decay_gamma=4.0,
    ce_loss_alpha=0.1,
    l1_loss_alpha=0.9,
)

train = dict(
    lr=6.0e-4,
    warmup_ratio=0.04,
    weight_decay=0.0,
    precision="bf16",
    local_batch_size=1,
    global_batch_size=512,
    num_train_epochs=10,
    max_train_steps=None,
    max_grad_norm=1.0,
    sharding_strategy="no_shard",
    torch_compile=True,
)

logging = dict(
    logging_steps=10,
    checkpointing_steps=3000,
)

data = dict(
    mode="offline",
    target_cache_path=None,  # set with --opts data.target_cache_path=<dir>
    chat_template="auto",
    max_length=4096,
    num_workers=4,
)
