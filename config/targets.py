"""The targets the shipped configs train on: one row per target, named by ``_target_``.

A config file that says ``_target_ = "qwen3_8b"`` gets that row, turned into config keys by
``COLUMNS[algorithm]``, over its ``_base_`` and under its own keys (the loader finds this
file next to the config or one folder up: deepspec/config/loader.py, read_config_layers).
So what differs between targets is written once here, not once per algorithm: within an
algorithm, the reference configs for Qwen3-4B/8B/14B and Gemma-4-12B differed only in
these columns (and exp_name).

Columns:

- ``target``: model.target_model_name_or_path (a hub id, or the embedded SmolLM2).
- ``num_hidden_layers``: the target's decoder layers, from its public HF config. Not a
  config key: it documents the layer ids, and tests/test_config.py checks them against it.
- ``block_layer_ids``: the five layers DSpark and DFlash read, spread over the stack, never
  the last one (its output is the final hidden state, which the loss already uses).
- ``eagle3_layer_ids``: the three (low, middle, high) Eagle3 reads, as EAGLE-3 and the
  serving engines use them (llama.cpp's Eagle3 takes exactly 3); a subset of the five, so
  one target cache serves all three algorithms.
- ``mask_token_id``: a spare id of the target's vocabulary whose embedding fills the block
  drafters' mask slots; None = a learned vector. Eagle3 has no mask slot and ignores it.
- ``torch_compile``: train.torch_compile (the compiled LM-head vocabulary kernel). Off for
  Gemma-4-12B, as its configs have always shipped; the kernel has not been measured there.

A new target: add a row, then a three-line ``config/<algo>/<algo>_<name>.py`` per algorithm
(copy a qwen3 one). A config of your own elsewhere can name a row too when its ``_base_`` is
a file under ``config/<algo>/`` (the table is also looked for next to the bases).
"""

TARGETS = {
    "qwen3_4b": dict(
        target="Qwen/Qwen3-4B",
        num_hidden_layers=36,
        block_layer_ids=[1, 9, 17, 25, 33],
        eagle3_layer_ids=[1, 17, 33],
        mask_token_id=151669,
        torch_compile=True,
    ),
    "qwen3_8b": dict(
        target="Qwen/Qwen3-8B",
        num_hidden_layers=36,
        block_layer_ids=[1, 9, 17, 25, 33],
        eagle3_layer_ids=[1, 17, 33],
        mask_token_id=151669,
        torch_compile=True,
    ),
    "qwen3_14b": dict(
        target="Qwen/Qwen3-14B",
        num_hidden_layers=40,
        block_layer_ids=[1, 10, 19, 28, 37],
        eagle3_layer_ids=[1, 19, 37],
        mask_token_id=151669,
        torch_compile=True,
    ),
    "gemma4_12b": dict(
        target="google/gemma-4-12B-it",
        num_hidden_layers=48,
        block_layer_ids=[5, 17, 29, 41, 46],
        eagle3_layer_ids=[5, 29, 46],
        mask_token_id=4,
        torch_compile=False,
    ),
    # the CPU target (config/<algo>/<algo>_smollm2_135m.py add their tuned recipes on top)
    "smollm2_135m": dict(
        target="embedded:smollm2-135m-instruct",
        num_hidden_layers=30,
        block_layer_ids=[1, 7, 14, 21, 27],
        eagle3_layer_ids=[1, 14, 27],
        mask_token_id=None,  # SmolLM2 has no spare token id: the mask slot is a learned vector
        torch_compile=True,
    ),
}

# The config key each column sets, per algorithm (columns not named here set nothing).
_BLOCK_DRAFTER = dict(
    target="model.target_model_name_or_path",
    block_layer_ids="model.target_layer_ids",
    mask_token_id="model.mask_token_id",
    torch_compile="train.torch_compile",
)
COLUMNS = {
    "dspark": _BLOCK_DRAFTER,
    "dflash": _BLOCK_DRAFTER,
    "eagle3": dict(
        target="model.target_model_name_or_path",
        eagle3_layer_ids="model.target_layer_ids",
        torch_compile="train.torch_compile",
    ),
}
