"""The minimal acceptance rule, with hand-computed losses."""

from __future__ import annotations

import math

import pytest

from fedem_flwr.errors import ConfigError
from fedem_flwr.gate.acceptance import Decision, decide

PARENT = {"hi": 3.4, "te": 3.424, "en": 2.0, "fr": 2.5}


def test_lower_loss_on_own_languages_is_accepted():
    # Execute: plain mean over hi, te: parent 3.412, candidate 3.398
    decision = decide({"hi": 3.39, "te": 3.406, "en": 2.0}, PARENT, ["hi", "te"])

    # Assert
    assert decision.accepted
    assert decision.reason == "loss 3.412 -> 3.398 on hi,te (-0.014)"
    assert decision.delta == pytest.approx(-0.014)


def test_equal_loss_passes_with_zero_margin_and_fails_with_a_margin():
    same = decide(dict(PARENT), PARENT, ["hi"])
    assert same == Decision(True, "loss 3.400 -> 3.400 on hi (+0.000)", 0.0)
    strict = decide(dict(PARENT), PARENT, ["hi"], margin=0.01)
    assert not strict.accepted
    assert strict.reason == "loss 3.400 -> 3.400 on hi (+0.000); needs <= -0.010 (margin 0.010)"


def test_margin_boundary_is_inclusive():
    assert decide({"en": 1.5}, {"en": 2.0}, ["en"], margin=0.5).accepted
    assert not decide({"en": 1.5}, {"en": 2.0}, ["en"], margin=0.75).accepted


def test_higher_loss_is_rejected_with_reason():
    decision = decide({"hi": 3.5}, PARENT, ["hi"])
    assert decision == Decision(False, "loss 3.400 -> 3.500 on hi (+0.100); needs no increase", pytest.approx(0.1))


def test_token_weighted_mean():
    # Prepare: hi improves by 0.3 on 100 tokens, te worsens by 0.1 on 900 tokens
    candidate, parent = {"hi": 2.7, "te": 3.1}, {"hi": 3.0, "te": 3.0}

    # Execute
    plain = decide(candidate, parent, ["hi", "te"])
    weighted = decide(candidate, parent, ["hi", "te"], weights={"hi": 100, "te": 900})

    # Assert: plain mean -0.1 accepts; weighted (0.1 * -0.3 + 0.9 * 0.1 = +0.06) rejects
    assert plain.accepted and plain.delta == pytest.approx(-0.1)
    assert not weighted.accepted and weighted.delta == pytest.approx(0.06)
    assert weighted.reason.startswith("loss 3.000 -> 3.060 on hi,te (+0.060)")


def test_missing_held_out_data_is_rejected():
    decision = decide({"hi": 1.0}, PARENT, ["hi", "xx"])
    assert not decision.accepted and math.isnan(decision.delta)
    assert decision.reason == "no held-out data for languages ['xx']"
    assert decide(PARENT, {"te": 1.0}, ["hi"]).reason == "no held-out data for languages ['hi']"
    zero_tokens = decide(PARENT, PARENT, ["hi", "te"], weights={"hi": 10, "te": 0})
    assert zero_tokens.reason == "no held-out data for languages ['te']"
    assert decide(PARENT, PARENT, []).reason == "the adapter declares no languages"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_are_rejected(bad):
    candidate = decide({"hi": bad}, PARENT, ["hi"])
    parent = decide({"hi": 3.0}, {"hi": bad}, ["hi"])
    assert not candidate.accepted and candidate.reason.startswith("non-finite candidate loss on {'hi'")
    assert not parent.accepted and parent.reason.startswith("non-finite parent loss on {'hi'")


def test_others_within_tolerance_pass_and_beyond_fail():
    # Prepare: hi improves; en rises by 0.04, fr by 0.2; "xx" has no data
    candidate = {"hi": 3.3, "en": 2.04, "fr": 2.7}

    # Execute
    loose = decide(candidate, PARENT, ["hi"], others=["en", "xx"], tolerance=0.05)
    tight = decide(candidate, PARENT, ["hi"], others=["en", "fr", "hi"], tolerance=0.05)

    # Assert
    assert loose.accepted
    assert loose.reason == (
        "loss 3.400 -> 3.300 on hi (-0.100); others within 0.050 on en; "
        "no held-out data for others ['xx'], skipped"
    )
    assert not tight.accepted
    assert tight.reason == (
        "loss 3.400 -> 3.300 on hi (-0.100); worse beyond tolerance 0.050 on fr 2.500 -> 2.700 (+0.200)"
    )
    assert tight.delta == pytest.approx(-0.1)


def test_others_non_finite_is_rejected():
    decision = decide({"hi": 3.0, "en": math.nan}, PARENT, ["hi"], others=["en"], tolerance=1.0)
    assert not decision.accepted and "non-finite candidate loss on {'en'" in decision.reason


def test_negative_margin_or_tolerance_is_a_config_error():
    with pytest.raises(ConfigError, match="`gate.margin` is -0.1"):
        decide(PARENT, PARENT, ["hi"], margin=-0.1)
    with pytest.raises(ConfigError, match="`gate.tolerance` is nan"):
        decide(PARENT, PARENT, ["hi"], tolerance=math.nan)
