"""When to merge, which adapters a merge absorbs, whether a merged base is published, and MergeConfig:
pure logic with hand-computed losses (no torch, no model)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import MergeConfig
from fedem_flwr.errors import ConfigError
from fedem_flwr.gate.acceptance import Decision, decide_base
from fedem_flwr.lineage.policy import Candidate, merge_due, select_absorbed

BASE = {"hi": 3.0, "te": 3.0, "en": 2.0}


# -- select_absorbed --------------------------------------------------------------------------------
def test_absorbs_only_unleased_adapters_that_beat_the_base_on_their_languages():
    # Prepare
    good = Candidate("lang-hi", 3, ("hi",), {"hi": 2.8, "te": 3.5, "en": 2.0})
    leased = Candidate("lang-te", 2, ("te",), {"hi": 3.0, "te": 2.5, "en": 2.0})
    worse = Candidate("lang-en", 1, ("en",), {"hi": 3.0, "te": 3.0, "en": 2.1})
    fresh = Candidate("lang-xx", 0, ("en",), dict(BASE))  # version 0: a zero delta equals the base

    # Execute
    selection = select_absorbed([good, leased, worse, fresh], {"lang-te"}, BASE)

    # Assert: the te loss of lang-hi is not its language, so it does not stop it
    assert selection.absorbed == (good,)
    reasons = dict(selection.skipped)
    assert list(reasons) == ["lang-te", "lang-en", "lang-xx"]
    assert reasons["lang-te"] == "under lease; waits for the next merge"
    assert reasons["lang-en"] == "does not beat the base: loss 2.000 -> 2.100 on en (+0.100); needs no increase"
    assert reasons["lang-xx"].startswith("does not beat the base: loss 2.000 -> 2.000 on en (+0.000)")


def test_with_residual_rebases_a_leased_adapter_is_absorbed_like_a_free_one():
    # Prepare: lang-te is leased, and beats the base on te
    leased = Candidate("lang-te", 2, ("te",), {"hi": 3.0, "te": 2.5, "en": 2.0})
    worse = Candidate("lang-en", 1, ("en",), {"hi": 3.0, "te": 3.0, "en": 2.1})

    # Execute
    residual = select_absorbed([leased, worse], {"lang-te", "lang-en"}, BASE, rebase="residual")
    zero = select_absorbed([leased, worse], {"lang-te", "lang-en"}, BASE, rebase="zero")

    # Assert: its push in flight lands as an update under residual; under zero it waits. Leased or not,
    # an adapter must still beat the bare base on its own languages.
    assert residual.absorbed == (leased,)
    assert residual.skipped == (("lang-en", "does not beat the base: loss 2.000 -> 2.100 on en (+0.100); "
                                            "needs no increase"),)
    assert zero.absorbed == ()
    assert [reason for _, reason in zero.skipped] == ["under lease; waits for the next merge"] * 2


def test_beating_the_base_is_token_weighted_like_the_gate():
    # Prepare: hi gains 0.3 on 100 tokens, te loses 0.1 on 900 tokens
    both = Candidate("south", 4, ("hi", "te"), {"hi": 2.7, "te": 3.1})

    # Execute
    plain = select_absorbed([both], (), BASE)
    weighted = select_absorbed([both], (), BASE, token_weights={"hi": 100, "te": 900})

    # Assert: plain mean -0.1 beats the base; token-weighted +0.06 does not
    assert plain.absorbed == (both,)
    assert weighted.absorbed == () and "+0.060" in weighted.skipped[0][1]


def test_an_adapter_without_heldout_losses_is_skipped_with_the_reason():
    selection = select_absorbed([Candidate("lang-th", 1, ("th",), {"th": 1.0})], (), BASE)
    assert selection.absorbed == ()
    assert selection.skipped == (("lang-th", "does not beat the base: no held-out data for languages ['th']"),)


# -- merge_due --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("accepted", "last", "now", "requested", "expected"),
    [
        (0, None, 0.0, True, "requested"),         # a request needs no accepted work
        (0, 0.0, 10_000.0, False, None),           # nothing accepted: no interval merge
        (3, 0.0, 10.0, False, "every_accepted"),
        (2, 0.0, 10.0, False, None),
        (2, 0.0, 100.0, False, "every_s"),
        (2, 50.0, 149.0, False, None),
        (1, None, 0.0, False, "every_s"),          # never merged, work accepted: due
    ],
)
def test_merge_triggers(accepted, last, now, requested, expected):
    cfg = MergeConfig(every_accepted=3, every_s=100.0)
    assert merge_due(accepted, last, now, cfg, requested) == expected


def test_triggers_set_to_null_are_off():
    cfg = MergeConfig(every_accepted=None, every_s=None)
    assert merge_due(1_000, 0.0, 1e9, cfg) is None
    assert merge_due(0, 0.0, 1e9, cfg, requested=True) == "requested"


# -- the base gate --------------------------------------------------------------------------------
def test_a_better_base_is_published():
    decision = decide_base({"hi": 2.9, "te": 2.95, "en": 2.0}, BASE, tolerance=0.05)
    assert decision.accepted and decision.delta == pytest.approx(-0.05)
    assert decision.reason == "loss 2.667 -> 2.617 over 3 languages (-0.050); every language within 0.050 on en,hi,te"


def test_a_base_worse_on_one_language_beyond_tolerance_is_refused_naming_it():
    # Prepare: better overall (-0.1 on hi and te each, +0.08 on en) but en is worse than 0.05 allows
    candidate = {"hi": 2.9, "te": 2.9, "en": 2.08}

    # Execute
    decision = decide_base(candidate, BASE, tolerance=0.05)

    # Assert
    assert not decision.accepted and decision.delta == pytest.approx(-0.04)
    assert decision.reason.endswith("worse beyond tolerance 0.050 on en 2.000 -> 2.080 (+0.080)")
    assert decide_base(candidate, BASE, tolerance=0.1).accepted


def test_an_unchanged_or_worse_base_is_refused_and_the_worse_languages_named():
    same = decide_base(dict(BASE), BASE)
    assert same == Decision(False, "loss 2.667 -> 2.667 over 3 languages (+0.000); needs a lower loss", 0.0)
    worse = decide_base({"hi": 3.2, "te": 3.0, "en": 2.0}, BASE, tolerance=0.1)
    assert not worse.accepted
    assert worse.reason.endswith("needs a lower loss; worse beyond tolerance 0.100 on hi 3.000 -> 3.200 (+0.200)")


def test_the_margin_and_token_weights_apply_over_all_languages():
    candidate = {"hi": 2.8, "te": 3.0, "en": 2.0}
    assert decide_base(candidate, BASE, margin=0.05).accepted            # plain mean -0.067
    assert decide_base(candidate, BASE, margin=0.1).reason.endswith("(-0.067); needs < -0.100 (margin 0.100)")
    weights = {"hi": 10, "te": 10, "en": 980}                              # weighted -0.002
    assert not decide_base(candidate, BASE, margin=0.01, weights=weights).accepted
    assert decide_base(candidate, BASE, weights=weights).delta == pytest.approx(-0.002)


def test_missing_or_non_finite_losses_refuse_the_base():
    missing = decide_base({"hi": 1.0, "te": 1.0}, BASE)
    assert not missing.accepted and math.isnan(missing.delta)
    assert missing.reason == "no held-out data for the candidate base on languages ['en']"
    nan = decide_base({"hi": math.nan, "te": 1.0, "en": 1.0}, BASE)
    assert not nan.accepted and "non-finite candidate loss on {'hi': nan}" == nan.reason
    assert decide_base({}, {}).reason == "the current base has no held-out losses to compare with"
    with pytest.raises(ConfigError, match="`merge.tolerance` is -1"):
        decide_base(BASE, BASE, tolerance=-1)


# -- MergeConfig ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_methods_that_combine_a_and_b_separately_are_refused(method):
    with pytest.raises(ConfigError) as err:
        load_config([f"merge.method={method}"])
    message = str(err.value)
    assert f"`merge.method` is {method!r}" in message and "lora_A and lora_B separately" in message
    assert "'sum', 'mean', 'cat', 'svd', 'ties_svd', 'dare_ties_svd'" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("merge.method=median", "`merge.method` is 'median'; allowed: 'sum', 'mean'"),
        ("merge.scale=0", "`merge.scale` is 0.0; it must be a finite number > 0."),
        ("merge.rebase=full", "`merge.rebase` is 'full'; allowed: 'zero', 'residual'."),
        ("merge.every_accepted=0", "`merge.every_accepted` is 0; it must be > 0."),
        ("merge.every_s=-5", "`merge.every_s` is -5.0; it must be > 0."),
        ("merge.margin=-0.1", "`merge.margin` is -0.1; it must be >= 0."),
        ("merge.tolerance=nan", "`merge.tolerance` is nan; it must be a finite number >= 0."),
        ("merge.density=0", "`merge.density` is 0.0; it must be in (0, 1]."),
        ("merge.density=1.5", "`merge.density` is 1.5; it must be in (0, 1]."),
        ("merge.seed=-1", "`merge.seed` is -1; it must be in [0, 2**63) or null."),
        ("+merge.weights.lang-hi=0", "`merge.weights.lang-hi` is 0.0; it must be a finite number > 0."),
    ],
)
def test_bad_merge_values_name_key_and_value(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert expected in str(err.value)


def test_merge_defaults_and_weights_compose():
    default = load_config().merge
    assert (default.method, default.scale, default.rebase, default.every_accepted, default.weight("anyone")) == (
        "mean", 0.5, "residual", 10, 1.0)
    cfg = load_config(["+merge.weights.lang-hi=0.5", "merge.every_s=null", "merge.method=dare_ties_svd"]).merge
    assert (cfg.weight("lang-hi"), cfg.weight("lang-te"), cfg.every_s, cfg.method) == (0.5, 1.0, None, "dare_ties_svd")


@pytest.mark.slow  # starts a process
def test_the_merge_policy_imports_no_torch():
    code = "import sys, fedem_flwr.lineage.merge; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
