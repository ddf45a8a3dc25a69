"""Shipped configs as one base per algorithm plus a table of targets (config/targets.py).

``tests/data/shipped_configs_resolved.json`` holds the fully resolved config of each of the
15 shipped ``config/<algo>/<algo>_<target>.py`` files as they resolved before the configs
became bases + a target table (generated from the 50-line files, HOME=/home/fixture). A
deliberate change to a shipped config or a schema default regenerates it:

    python tests/unit/config/test_config_table.py --regenerate
"""

from __future__ import annotations

import glob
import json
import os
import runpy
import sys

import pytest

if __name__ == "__main__":  # run as a script to regenerate the fixture
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from deepspec.config import config_to_dict, load_config
from deepspec.config.sources import read_config_layers
from deepspec.errors import ConfigError
from tests.conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "data", "shipped_configs_resolved.json")
FIXTURE_HOME = "/home/fixture"  # checkpoint and TensorBoard dirs derive from ~
TABLE = runpy.run_path(os.path.join(ROOT, "config", "targets.py"))
TARGETS, COLUMNS = TABLE["TARGETS"], TABLE["COLUMNS"]
ALGOS = ("dspark", "dflash", "eagle3")


def _canonical(tree):
    """JSON text: equal only when values and types (1 vs 1.0, [] vs None) are equal."""
    return json.dumps(tree, sort_keys=True, indent=1)


def _resolved(path):
    return config_to_dict(load_config(path))


def _shipped():
    with open(FIXTURE, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------
# the shipped configs resolve exactly as before
# --------------------------------------------------------------------------------------


def test_fixture_covers_every_shipped_config():
    shipped = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "config", "*", "*.py"))
        if os.path.basename(p) != "base.py"
    )
    assert shipped == sorted(_shipped()) and len(shipped) == 15


@pytest.mark.parametrize("rel", sorted(_shipped()), ids=os.path.basename)
def test_shipped_config_resolves_as_before(rel, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", FIXTURE_HOME)
    want = _canonical(_shipped()[rel])
    assert _canonical(_resolved(os.path.join(ROOT, rel))) == want
    monkeypatch.chdir(ROOT)  # the relative path the README and train.sh use
    assert _canonical(_resolved(rel)) == want
    monkeypatch.chdir(tmp_path)  # bases resolve next to the file, wherever you stand
    assert _canonical(_resolved(os.path.join(ROOT, rel))) == want


def test_opts_still_win_over_base_and_target():
    path = os.path.join(ROOT, "config", "dspark", "dspark_qwen3_8b.py")
    cfg = load_config(
        path, ["model.target_layer_ids=[2, 4]", "train.torch_compile=false", "algorithm=dflash"]
    )
    assert list(cfg.model.target_layer_ids) == [2, 4] and cfg.train.torch_compile is False
    # the target row is mapped for the algorithm the files name; --opts only switch it after
    assert cfg.algorithm == "dflash" and cfg.model.mask_token_id == 151669


# --------------------------------------------------------------------------------------
# the table and the bases
# --------------------------------------------------------------------------------------


def test_every_target_row_has_a_config_per_algorithm():
    for algo in ALGOS:
        for name in TARGETS:
            path = os.path.join(ROOT, "config", algo, f"{algo}_{name}.py")
            assert os.path.isfile(path), path
            layers = read_config_layers(path)
            sources = [source for source, _ in layers]
            assert sources[0].endswith(os.path.join("config", algo, "base.py"))
            assert sources[1].endswith(os.path.join("config", "targets.py") + f", target {name}")


def test_target_table_rows():
    from tests.helpers import TARGET_LAYERS  # the layer counts, written down independently

    for name, row in TARGETS.items():
        assert set(row) == {
            "target",
            "num_hidden_layers",
            "block_layer_ids",
            "eagle3_layer_ids",
            "mask_token_id",
            "torch_compile",
        }, name
        assert row["num_hidden_layers"] == TARGET_LAYERS[name]
        block, eagle = row["block_layer_ids"], row["eagle3_layer_ids"]
        assert len(block) == 5 and len(eagle) == 3 and set(eagle) <= set(block)
        assert block == sorted(set(block)) and 0 <= block[0] and block[-1] < row["num_hidden_layers"] - 1
    assert set(COLUMNS) == set(ALGOS)


def test_per_target_files_only_name_base_target_and_exp_name():
    for algo in ALGOS:
        for name in TARGETS:
            if name == "smollm2_135m":  # the tuned CPU recipe: its own keys on top
                continue
            layers = read_config_layers(os.path.join(ROOT, "config", algo, f"{algo}_{name}.py"))
            assert layers[-1][1] == {"exp_name": f"{algo}_{'ttt7' if algo == 'eagle3' else 'block7'}_{name}"}


@pytest.mark.parametrize("algo", ALGOS)
def test_base_alone_is_the_algorithm_on_the_schema_defaults(algo):
    base = os.path.join(ROOT, "config", algo, "base.py")
    assert config_to_dict(load_config(base)) == config_to_dict(load_config(opts=[f"algorithm={algo}"]))


# --------------------------------------------------------------------------------------
# _base_ and _target_ in config files of your own
# --------------------------------------------------------------------------------------

_TABLE = """
TARGETS = {
    "tiny": dict(target="tiny/a", ids=[1, 3], mask=7, compile=True),
    "small": dict(target="tiny/b", ids=[2, 4], mask=None, compile=False),
}
COLUMNS = {
    "dspark": dict(target="model.target_model_name_or_path", ids="model.target_layer_ids",
                   mask="model.mask_token_id", compile="train.torch_compile"),
    "dflash": dict(target="model.target_model_name_or_path", ids="model.target_layer_ids"),
    "eagle3": dict(target="model.target_model_name_or_path"),
}
"""


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_and_target_precedence(tmp_path):
    _write(tmp_path / "targets.py", _TABLE)
    _write(tmp_path / "algo" / "root.py", "algorithm = 'dspark'\ntrain = dict(lr=1e-4, torch_compile=True)\n")
    _write(
        tmp_path / "algo" / "base.py",
        "_base_ = 'root.py'\nmodel = dict(block_size=5, mask_token_id=3)\ntrain = dict(warmup_ratio=0.1)\n",
    )
    leaf = _write(
        tmp_path / "algo" / "leaf.py",
        "_base_ = 'base.py'\n_target_ = 'small'\nmodel = dict(block_size=6)\n_helper = 3\n",
    )
    cfg = load_config(leaf)
    assert cfg.model.block_size == 6  # the file's own keys win
    assert cfg.model.mask_token_id is None and cfg.train.torch_compile is False  # the row wins over bases
    assert list(cfg.model.target_layer_ids) == [2, 4] and cfg.model.target_model_name_or_path == "tiny/b"
    assert cfg.train.lr == 1e-4 and cfg.train.warmup_ratio == 0.1  # bases fill the rest
    sources = [s for s, _ in read_config_layers(leaf)]
    assert [os.path.basename(s) for s in sources] == [
        "root.py",
        "base.py",
        "targets.py, target small",
        "leaf.py",
    ]


def test_target_follows_the_algorithm_the_files_name(tmp_path):
    _write(tmp_path / "targets.py", _TABLE)
    leaf = _write(tmp_path / "c.py", "algorithm = 'dflash'\n_target_ = 'tiny'\n")
    cfg = load_config(leaf)
    assert list(cfg.model.target_layer_ids) == [1, 3] and cfg.model.mask_token_id is None  # no mask column
    assert cfg.train.torch_compile is False


def test_yaml_base_and_target(tmp_path):
    _write(tmp_path / "targets.py", _TABLE)
    _write(tmp_path / "base.py", "algorithm = 'dspark'\nseed = 7\n")
    leaf = _write(
        tmp_path / "sub" / "c.yaml", "_base_: ../base.py\n_target_: tiny\nmodel:\n  block_size: 4\n"
    )
    cfg = load_config(leaf)
    assert cfg.seed == 7 and cfg.model.block_size == 4 and cfg.model.mask_token_id == 7


def test_table_found_next_to_a_base(tmp_path):
    shipped_base = os.path.join(ROOT, "config", "dspark", "base.py")
    leaf = _write(tmp_path / "mine.py", f"_base_ = {shipped_base!r}\n_target_ = 'qwen3_8b'\n")
    cfg = load_config(leaf)
    assert cfg.algorithm == "dspark" and cfg.model.target_model_name_or_path == "Qwen/Qwen3-8B"
    assert cfg.exp_name == "dspark_Qwen3-8B"  # derived: no exp_name collides with the shipped run's


def test_building_on_a_shipped_per_target_config(tmp_path):
    shipped = os.path.join(ROOT, "config", "eagle3", "eagle3_smollm2_135m.py")
    leaf = _write(tmp_path / "mine.py", f"_base_ = {shipped!r}\ntrain = dict(lr=2e-3)\n")
    cfg = load_config(leaf)
    assert cfg.train.lr == 2e-3 and cfg.model.eagle3_num_positions == 64
    assert list(cfg.model.target_layer_ids) == [1, 14, 27]


def _error(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_target_lists_the_known_ones(tmp_path):
    _write(tmp_path / "targets.py", _TABLE)
    message = _error(_write(tmp_path / "c.py", "_target_ = 'tyni'\n"))
    assert "_target_: 'tyni' is not a target of" in message and "known targets: tiny, small" in message
    base = os.path.join(ROOT, "config", "dspark", "base.py")
    mine = tmp_path / "far" / "away" / "c.py"  # no table near it: the one next to its base is read
    shipped = _error(_write(mine, f"_base_ = {base!r}\n_target_ = 'qwen3_9b'\n"))
    assert "known targets: qwen3_4b, qwen3_8b, qwen3_14b, gemma4_12b, smollm2_135m" in shipped


def test_all_problems_at_once(tmp_path):
    _write(tmp_path / "targets.py", _TABLE)
    path = _write(
        tmp_path / "c.py",
        "_base_ = 'bsae.py'\n_target_ = 'nope'\n_tagret_ = 'tiny'\nmodel = dict(blok_size=3)\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lrr=1"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("invalid config: ")
    assert "_base_: 'bsae.py' not found" in message
    assert "_target_: 'nope' is not a target" in message
    assert "_tagret_: not a loader name" in message
    assert "model.blok_size: unknown key" in message and "train.lrr: unknown key" in message
    assert message.count(f"(from {path})") == 4
    with pytest.raises(ConfigError, match="bsae.py") as info:
        read_config_layers(path)  # on its own: the file's problems
    assert "blok_size" not in str(info.value)


def test_base_and_target_errors(tmp_path):
    loop_a = _write(tmp_path / "a.py", "_base_ = 'b.py'\n")
    _write(tmp_path / "b.py", "_base_ = 'a.py'\n")
    assert "builds on itself" in _error(loop_a)
    assert "must be the path of a config file, not 3" in _error(_write(tmp_path / "n.py", "_base_ = 3\n"))
    assert "must be a target name, not ['x']" in _error(_write(tmp_path / "t.py", "_target_ = ['x']\n"))
    lonely = tmp_path / "deep" / "er" / "c.py"
    assert "needs a targets.py table next to the config file or one folder up" in _error(
        _write(lonely, "_target_ = 'tiny'\n")
    )
    _write(tmp_path / "crash" / "base.py", "algorithm = 'dspark'\nraise KeyError('x')\n")
    message = _error(_write(tmp_path / "crash" / "c.py", "_base_ = 'base.py'\n"))
    assert os.path.join("crash", "base.py") + ":2: the config file raised KeyError" in message


def test_bad_table_values_name_the_row(tmp_path):
    _write(tmp_path / "targets.py", _TABLE.replace("ids=[2, 4]", "ids=[4, 2]"))
    message = _error(_write(tmp_path / "c.py", "_target_ = 'small'\n"))
    assert "model.target_layer_ids: [4, 2] must be strictly increasing" in message
    assert "targets.py, target small)" in message
    _write(
        tmp_path / "t2" / "targets.py",
        "TARGETS = {'x': dict(target='a')}\nCOLUMNS = {'dspark': dict(ids='model.target_layer_ids')}\n",
    )
    assert "row 'x' of" in _error(_write(tmp_path / "t2" / "c.py", "_target_ = 'x'\n"))
    _write(tmp_path / "t3" / "targets.py", "TARGETS = {}\n")
    assert "must define the dicts TARGETS and COLUMNS" in _error(
        _write(tmp_path / "t3" / "c.py", "_target_ = 'x'\n")
    )


def _regenerate() -> None:
    """Rewrite the fixture from the configs as they resolve now (see the module docstring)."""
    os.environ["HOME"] = FIXTURE_HOME
    paths = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "config", "*", "*.py"))
        if os.path.basename(p) != "base.py"
    )
    resolved = {rel: _resolved(os.path.join(ROOT, rel)) for rel in paths}
    with open(FIXTURE, "w", encoding="utf-8") as fh:
        fh.write(_canonical(resolved) + "\n")
    print(f"wrote {FIXTURE} ({len(resolved)} configs)")


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    _regenerate()
