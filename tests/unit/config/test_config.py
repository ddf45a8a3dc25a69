"""Config system: shipped configs, overrides of every type, and every error path."""

from __future__ import annotations

import dataclasses
import glob
import operator
import os
import subprocess
import sys

import pytest

from deepspec.config import (
    FIELDS,
    FIELDS_BY_KEY,
    Config,
    ModelConfig,
    config_to_dict,
    get_default_config,
    load_config,
    parse_opts,
    save_config,
    validate_against_target,
)
from deepspec.errors import ConfigError
from deepspec.targets.family import family_spec_from_config
from deepspec.targets.tiny import tiny_config
from tests.conftest import ROOT
from tests.helpers import TARGET_LAYERS

# The per-target configs; config/<algo>/base.py, which they build on, is tested in
# test_config_table.py.
SHIPPED = sorted(
    p for p in glob.glob(os.path.join(ROOT, "config", "*", "*.py")) if os.path.basename(p) != "base.py"
)


def test_every_algorithm_and_target_has_a_config():
    names = {os.path.relpath(p, os.path.join(ROOT, "config")) for p in SHIPPED}
    for algo in ("dspark", "dflash", "eagle3"):
        for target in TARGET_LAYERS:
            assert f"{algo}/{algo}_{target}.py" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(p))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    algo = os.path.basename(os.path.dirname(path))
    assert cfg.algorithm == algo
    target = os.path.basename(path)[len(algo) + 1 : -3]
    n_layers = TARGET_LAYERS[target]
    ids = list(cfg.model.target_layer_ids)
    assert len(ids) == (3 if algo == "eagle3" else 5) and ids == sorted(set(ids))
    if algo == "eagle3":  # the engines' 3 layers, a subset of the block drafters': one cache serves all
        assert set(ids) <= set(load_config(path.replace("eagle3", "dspark")).model.target_layer_ids)
    assert 0 <= ids[0] and ids[-1] < n_layers - 1, "never the target's last layer"
    if algo == "dflash":
        assert cfg.model.markov_rank == 0 and cfg.model.confidence_head_alpha == 0
        assert (cfg.model.ce_loss_alpha, cfg.model.l1_loss_alpha) == (1.0, 0.0)
    if algo == "dspark":
        assert cfg.model.markov_rank > 0 and cfg.model.confidence_head_alpha > 0
    if target != "smollm2_135m":  # the reference hyperparameters (docs/DESIGN.md §2)
        assert cfg.train.lr == 6e-4 and cfg.train.global_batch_size == 512
        assert cfg.train.num_train_epochs == 10 and cfg.data.max_length == 4096
        if algo != "eagle3":
            assert cfg.model.block_size == 7 and cfg.model.num_draft_layers == 5
        else:
            assert cfg.model.draft_num_hidden_layers == 1 and cfg.model.ttt_length == 7
    assert cfg.logging.checkpoint_dir.endswith(os.path.join(cfg.project_name, cfg.exp_name))


def test_defaults_are_the_reference_setting():
    cfg = load_config()
    assert cfg.algorithm == "dspark"
    assert cfg.model.block_size == 7 and cfg.model.num_draft_layers == 5
    assert list(cfg.model.target_layer_ids) == [1, 9, 17, 25, 33]
    assert cfg.model.num_anchors == 512 and cfg.model.markov_rank == 256
    assert (cfg.model.ce_loss_alpha, cfg.model.l1_loss_alpha, cfg.model.confidence_head_alpha) == (
        0.1,
        0.9,
        1.0,
    )
    assert cfg.train.lr == 6e-4 and cfg.train.warmup_ratio == 0.04 and cfg.train.precision == "bf16"
    assert cfg.seed == 42 and cfg.data.max_length == 4096


def test_algorithm_defaults_follow_opts():
    cfg = load_config(opts=["algorithm=dflash"])
    assert cfg.model.markov_rank == 0 and cfg.model.ce_loss_alpha == 1.0
    # explicit values still win over algorithm defaults
    cfg = load_config(opts=["algorithm=dflash", "model.markov_rank=64"])
    assert cfg.model.markov_rank == 64


@pytest.mark.parametrize(
    "opt, key, expected",
    [
        ("model.block_size=8", "model.block_size", 8),
        ("train.lr=3e-4", "train.lr", 3e-4),  # YAML reads 3e-4 as a string; coerced
        ("train.lr=1", "train.lr", 1.0),  # int accepted for a float key
        ("train.torch_compile=true", "train.torch_compile", True),
        ("data.shuffle=False", "data.shuffle", False),
        ("exp_name=my_run", "exp_name", "my_run"),
        ("model.target_layer_ids=[0, 4, 8]", "model.target_layer_ids", [0, 4, 8]),
        ("model.target_layer_ids=-1,3", "model.target_layer_ids", [-1, 3]),
        ("data.train_data_paths=a.jsonl,b.jsonl", "data.train_data_paths", ["a.jsonl", "b.jsonl"]),
        ("data.train_data_paths=[c.jsonl]", "data.train_data_paths", ["c.jsonl"]),
        ("model.mask_token_id=null", "model.mask_token_id", None),
        ("model.mask_token_id=7", "model.mask_token_id", 7),
        ("train.max_train_steps=None", "train.max_train_steps", None),
        ("data.target_cache_path=/data/cache", "data.target_cache_path", "/data/cache"),
    ],
)
def test_override_types(opt, key, expected):
    cfg = load_config(opts=[opt])
    value = operator.attrgetter(key)(cfg)
    assert value == expected and type(value) is type(expected)


def test_yacs_style_pairs_and_repeated_opts():
    assert parse_opts(["train.lr", "0.1", "model.block_size=3"]) == {"train.lr": 0.1, "model.block_size": 3}
    cfg = load_config(opts=["train.lr", "0.1", "model.block_size=3"])
    assert cfg.train.lr == 0.1 and cfg.model.block_size == 3


@pytest.mark.parametrize(
    "opts, fragments",
    [
        (["train.lrr=1"], ["train.lrr", "unknown key", "train.lr"]),
        (["model.lr=1"], ["model.lr", "train.lr"]),
        (["model.blocksize=3"], ["model.blocksize", "model.block_size"]),
        (["model.block_size=abc"], ["model.block_size", "expected an integer", "'abc'"]),
        (["model.block_size=2.5"], ["model.block_size", "expected an integer"]),
        (["train.lr=[1]"], ["train.lr", "expected a number"]),
        (["train.torch_compile=maybe"], ["train.torch_compile", "true or false"]),
        (["model.block_size=0"], ["model.block_size", "0 is invalid", ">= 1"]),
        (["model.block_size=null"], ["model.block_size", "must not be null"]),
        (["model.target_layer_ids=[3, 1]"], ["model.target_layer_ids", "strictly increasing"]),
        (["model.target_layer_ids=[1, 1]"], ["model.target_layer_ids", "strictly increasing"]),
        (["model.target_layer_ids=[-2, 1]"], ["model.target_layer_ids", ">= -1"]),
        (["model.target_layer_ids=[]"], ["model.target_layer_ids", "at least one"]),
        (["train.precision=fp16"], ["train.precision", "fp16", "bf16, fp32"]),
        (["algorithm=medusa"], ["algorithm", "medusa", "dspark"]),
        (["train.warmup_ratio=2"], ["train.warmup_ratio", "<= 1"]),
        (["model.loss_decay_gamma=0"], ["model.loss_decay_gamma", "> 0"]),
        (["train.lr=nan"], ["train.lr", "finite"]),
        (["train.lr=.inf"], ["train.lr", "finite"]),
        (["train.lr=-1e-3"], ["train.lr", "> 0"]),
        (["train.weight_decay=-0.1"], ["train.weight_decay", ">= 0"]),
        (["train.adam_beta2=1"], ["train.adam_beta2", "< 1"]),
        (["train.global_batch_size=10", "train.local_batch_size=4"], ["not a multiple"]),
        (["model.ce_loss_alpha=0", "model.l1_loss_alpha=0"], ["ce_loss_alpha + l1_loss_alpha"]),
        (["data.chat_template=/no/such/template.jinja"], ["data.chat_template", "neither 'auto'"]),
        (["train.lrr"], ["expected key.path=value"]),
    ],
)
def test_errors_name_key_and_value(opts, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(opts=opts)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(opts=["train.lrr=1", "model.block_size=0", "train.precision=fp8"])
    message = str(info.value)
    assert "train.lrr" in message and "model.block_size" in message and "train.precision" in message


def test_python_config_file_errors(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("import os\nmodel = dict(block_size=4, blok_size=3)\n")
    with pytest.raises(ConfigError, match=r"model\.blok_size: unknown key; did you mean model\.block_size"):
        load_config(bad_key)
    bad_top = tmp_path / "bad_top.py"
    bad_top.write_text("modle = dict(block_size=4)\n")
    with pytest.raises(ConfigError, match=r"modle\.block_size.*model\.block_size"):
        load_config(bad_top)
    crashes = tmp_path / "crash.py"
    crashes.write_text("algorithm = 'dspark'\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"crash\.py:2: the config file raised RuntimeError: boom"):
        load_config(crashes)
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n    block_size=3,\n    x=,\n)\n")
    with pytest.raises(ConfigError, match=r"broken\.py:3:\d+: invalid Python"):
        load_config(broken)
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=r"exits\.py:2: the config file raised SystemExit"):
        load_config(exits)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.py")
    other = tmp_path / "c.toml"
    other.write_text("")
    with pytest.raises(ConfigError, match="unsupported extension"):
        load_config(other)


def test_yaml_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "algorithm: eagle3\nmodel:\n  ttt_length: 5\n  target_layer_ids: [2, 4]\ntrain:\n  lr: 1.0e-4\n"
    )
    cfg = load_config(path, ["model.ttt_length=6"])
    assert cfg.algorithm == "eagle3" and cfg.model.ttt_length == 6 and cfg.train.lr == 1e-4
    path.write_text("algorithm: dspark\nmodel: [1, 2\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml:3:1: invalid YAML \(while parsing a flow sequence started "
        r"at line 2 column 8: .*fix the syntax",
    ):
        load_config(path)
    path.write_text("model:\n  block_size: 3\n  target_layer_ids: [1]\n  block_size: 4\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml:4:3: duplicate key 'block_size' \(first given on line 2\)"
    ):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\ntrain:\n  weight_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:1: duplicate key 'train'"):
        load_config(path)
    path.write_text("base: &b {block_size: 3}\nmodel:\n  <<: *b\n  block_size: 4\n")  # merges may repeat
    with pytest.raises(ConfigError, match="base.block_size: unknown key"):
        load_config(path)
    path.write_text("model:\n")
    with pytest.raises(ConfigError, match="model: is a section"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_derived_dirs_and_exp_name(tmp_path):
    cfg = load_config(
        opts=[
            f"logging.checkpoint_root={tmp_path}/ck",
            f"logging.tensorboard_root={tmp_path}/tb",
            "project_name=p",
            "model.target_model_name_or_path=embedded:smollm2-135m-instruct",
        ]
    )
    assert cfg.exp_name == "dspark_smollm2-135m-instruct"
    assert cfg.logging.checkpoint_dir == f"{tmp_path}/ck/p/dspark_smollm2-135m-instruct"
    assert cfg.logging.tensorboard_dir == f"{tmp_path}/tb/p/dspark_smollm2-135m-instruct"
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen once loaded
        cfg.logging.checkpoint_dir = str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.exp_name = "other"


@pytest.mark.parametrize("path", SHIPPED[:3] + [None], ids=lambda p: os.path.basename(p) if p else "defaults")
def test_save_and_load_round_trip(tmp_path, path):
    cfg = load_config(path, ["train.lr=2e-4", "data.shuffle=false"])
    out = tmp_path / "resolved" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def test_every_field_has_help_and_valid_default():
    cfg = get_default_config()
    for field in FIELDS:
        assert field.help
        assert field.key.count(".") <= 1
    assert cfg.algorithm == "dspark"


def test_the_schema_is_the_typed_dataclasses():
    """``FIELDS`` is a view of the dataclasses: each key's default, kind and bounds once."""
    cfg = load_config()
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)
    assert [f.key for f in FIELDS][:4] == ["project_name", "exp_name", "seed", "algorithm"]
    fresh = Config()
    for field in FIELDS:
        assert operator.attrgetter(field.key)(fresh) == field.default, field.key
    assert (
        FIELDS_BY_KEY["model.mask_token_id"].kind == "int" and FIELDS_BY_KEY["model.mask_token_id"].optional
    )
    assert FIELDS_BY_KEY["model.target_layer_ids"].kind == "list[int]"
    assert FIELDS_BY_KEY["train.adam_beta2"].exclusive_maximum == 1.0
    assert FIELDS_BY_KEY["algorithm"].choices == ("dspark", "dflash", "eagle3")
    assert Config().model.target_layer_ids is not Config().model.target_layer_ids  # no shared lists
    assert Config.from_flat({"model.block_size": 3, "seed": 1}) == Config(
        seed=1, model=ModelConfig(block_size=3)
    )


def test_validate_against_target():
    spec = family_spec_from_config(tiny_config("qwen3", num_hidden_layers=4, vocab_size=100))
    validate_against_target(load_config(opts=["model.target_layer_ids=[-1, 1, 3]"]), spec)
    with pytest.raises(ConfigError, match=r"model\.target_layer_ids: \[1, 4\] out of range.*4 layers"):
        validate_against_target(load_config(opts=["model.target_layer_ids=[1, 4]"]), spec)
    with pytest.raises(ConfigError, match=r"model\.mask_token_id: 100 is outside"):
        validate_against_target(
            load_config(opts=["model.target_layer_ids=[1]", "model.mask_token_id=100"]), spec
        )


def test_train_cli_unknown_key_one_line():
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "config/dspark/dspark_smollm2_135m.py",
            "--opts",
            "train.lrr=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.lrr" in lines[0] and "train.lr?" in lines[0]


def test_the_reference_configs_eval_section_is_noted_and_dropped(tmp_path, capsys):
    """The reference's configs carry ``eval = dict(...)`` and ``data.num_workers``, which
    training does not read: one note per reason, nothing stored, every other key kept."""
    path = tmp_path / "ref.py"
    path.write_text("eval = dict(tasks=['gsm8k'], seed=3)\ndata = dict(num_workers=4, shuffle=False)\n")
    cfg = load_config(path, ["eval.max_new_tokens=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "note: ignoring eval.tasks, eval.seed, eval.max_new_tokens: train.py does not evaluate; "
        "pass these to eval.py as flags (eval.py --help)",
        "note: ignoring data.num_workers: batches are read in the training process",
    ]
    assert "eval" not in config_to_dict(cfg) and "num_workers" not in config_to_dict(cfg)["data"]
    assert cfg.data.shuffle is False
    with pytest.raises(ConfigError, match="evall.tasks: unknown key"):
        load_config(None, ["evall.tasks=gsm8k"])
