"""The two confidence-threshold rules of :class:`~deepspec.eval.policies.VerifyPolicy` on
hand-made confidences, and how eval.py's flags pick them.

``threshold`` (``--confidence-threshold``) is the DeepSpec reference's rule: verify the
drafted tokens before the first slot whose own confidence is below ``t``. ``cumulative``
(``--survival-threshold``) cuts where the running product of the confidences falls below ``t``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from deepspec.errors import ConfigError
from deepspec.eval.policies import VerifyPolicy, survival
from deepspec.eval.settings import EvalSettings, resolve_policy, resolve_settings
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "confidence, t, per_slot, cumulative",
    [
        ([0.9, 0.6, 0.9, 0.2], 0.5, 3, 2),  # survival .9 .54 .486 .0972
        ([0.4, 0.9, 0.9], 0.5, 0, 0),  # slot 0 below t: no drafted token is verified
        ([0.9, 0.8], 0.5, 2, 2),  # no slot below t: every drafted token
        ([0.5, 0.5, 0.5], 0.5, 3, 1),  # equal to t is not below it; survival .5 .25 .125
        ([0.6] * 6, 0.5, 6, 1),  # survival .6 .36 ...
        ([0.9, 0.2, 0.9], 0.5, 1, 1),  # a confident slot after the cut does not extend it
        ([0.0, 0.0], 0.0, 2, 2),  # t = 0 never cuts (the reference: t <= 0 verifies the block)
        ([1.0, 0.99, 1.0], 1.0, 1, 1),  # t = 1 keeps only slots of confidence exactly 1
    ],
)
def test_per_slot_and_cumulative_rules_on_hand_made_confidences(confidence, t, per_slot, cumulative):
    drafted = [len(confidence)]
    assert VerifyPolicy("threshold", t).lengths(drafted, [confidence]) == [per_slot]
    assert VerifyPolicy("cumulative", t).lengths(drafted, [confidence]) == [cumulative]


def test_rules_read_only_the_drafted_slots():
    confidence = [[0.9, 0.6, 0.9, 0.2], [0.3, 0.9]]  # a row's list may be longer than it drafted
    assert VerifyPolicy("threshold", 0.5).lengths([2, 2], confidence) == [2, 0]
    assert VerifyPolicy("threshold", 0.5).lengths([0, 1], confidence) == [0, 0]
    assert VerifyPolicy("cumulative", 0.5).lengths([3, 1], confidence) == [2, 0]


def test_threshold_is_the_first_slot_below_t_on_random_blocks():
    """Against a numpy statement of the reference's rule on sigmoid-ed random logits, and
    the cumulative rule against numpy's running product; the cumulative rule never verifies
    more than the per-slot rule with the same t (``a_k <= c_k``)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(1.0, 2.0, size=(400, 7))
    conf = 1.0 / (1.0 + np.exp(-logits))
    for t in (0.0, 0.05, 0.3, 0.5, 0.8, 0.99, 1.0):
        below = conf < t
        reference = np.where(below.any(axis=1), below.argmax(axis=1), conf.shape[1])
        under = np.cumprod(conf, axis=1) < t
        products = np.where(under.any(axis=1), under.argmax(axis=1), conf.shape[1])
        drafted = [conf.shape[1]] * len(conf)
        per_slot = VerifyPolicy("threshold", t).lengths(drafted, conf.tolist())
        cumulative = VerifyPolicy("cumulative", t).lengths(drafted, conf.tolist())
        assert per_slot == reference.tolist()
        assert cumulative == products.tolist()
        assert all(c <= p for c, p in zip(cumulative, per_slot, strict=True))
        if 0.05 <= t <= 0.8:  # the same t verifies longer prefixes under the per-slot rule
            assert sum(per_slot) > sum(cumulative)


def test_survival_is_the_running_product():
    assert survival([0.5, 0.5, 0.25]) == [0.5, 0.25, 0.0625]
    assert survival([]) == []


def test_describe_names_the_rule():
    assert VerifyPolicy("threshold", 0.4).describe() == "threshold 0.4 (per slot)"
    assert VerifyPolicy("cumulative", 0.4).describe() == "cumulative 0.4 (survival)"


# ---- eval.py's flags ------------------------------------------------------------------------


def _eval_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REQUIRED = ["--target_name_or_path", "t", "--draft_name_or_path", "d"]


@pytest.mark.parametrize(
    "flags, policy, value",
    [
        ([], "fixed", 0.0),
        (["--confidence-threshold", "0.3"], "threshold", 0.3),
        (["--policy", "threshold", "--confidence-threshold", "0.3"], "threshold", 0.3),
        (["--survival-threshold", "0.2"], "cumulative", 0.2),
        (["--policy", "cumulative", "--survival-threshold", "0.2"], "cumulative", 0.2),
        (["--policy", "fixed"], "fixed", 0.0),
    ],
)
def test_flags_resolve_to_the_policy_and_its_threshold(flags, policy, value):
    cli = _eval_cli()
    args = cli.parse_args([*REQUIRED, *flags])
    assert cli.check_policy_args(args) == policy
    settings = resolve_settings(
        EvalSettings(
            tasks=["gsm8k"],
            confidence_threshold=args.confidence_threshold,
            survival_threshold=args.survival_threshold,
            policy=args.policy,
        )
    )
    assert settings.policy == policy
    assert settings.verify_policy() == VerifyPolicy(policy, value)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--policy", "threshold"], "--policy threshold needs --confidence-threshold > 0"),
        (["--policy", "cumulative"], "--policy cumulative needs --survival-threshold > 0"),
        (["--policy", "fixed", "--survival-threshold", "0.5"], "--survival-threshold applies to --policy cumulative, not fixed"),
        (["--policy", "threshold", "--confidence-threshold", "0.5", "--survival-threshold", "0.5"],
         "--survival-threshold applies to --policy cumulative, not threshold"),
        (["--policy", "cumulative", "--survival-threshold", "0.5", "--confidence-threshold", "0.5"],
         "--confidence-threshold applies to --policy threshold, not cumulative"),
        (["--confidence-threshold", "0.5", "--survival-threshold", "0.5"],
         "pass only one of --confidence-threshold"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_are_one_line_config_errors(flags, fragment):
    cli = _eval_cli()
    with pytest.raises(ConfigError) as caught:
        cli.check_policy_args(cli.parse_args([*REQUIRED, *flags]))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_resolve_policy_keeps_an_explicit_policy():
    assert resolve_policy("scheduled", 0.0, 0.0) == "scheduled"
    assert resolve_policy("auto", 0.0) == "fixed"
    with pytest.raises(ConfigError, match="pass only one of"):
        resolve_policy("auto", 0.1, 0.1)
