"""Eagle3 on google/gemma-4-12B-it (48 layers) — the reference training setting.

Eagle3: one autoregressive decoder layer trained with a 7-step training-time test.
Three target layers (low, middle, high) as EAGLE-3 and the serving engines use them
(llama.cpp's Eagle3 takes exactly 3), never the last one (its output is the final
hidden state, which the loss already uses); a subset of the block drafters' five, so one
target cache serves all three algorithms.
"""

algorithm = "eagle3"
project_name = "deepspec"
exp_name = "eagle3_ttt7_gemma4_12b"
seed = 42

model = dict(
    target_model_name_or_path="google/gemma-4-12B-it",
    target_layer_ids=[5, 29, 46],
    draft_num_hidden_layers=1,
    ttt_length=7,
    step_loss_decay=0.8,
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
    torch_compile=False,
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
