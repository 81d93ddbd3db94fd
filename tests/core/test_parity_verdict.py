"""The parity command's verdict: pass, fp32-bound (an accepted exception) or mismatch."""

from samenet.conformance import FP32_FACTOR, LOSS_RTOL
from samenet.parity import ACCEPTED, verdict

BASE = {"params_ok": True, "fwd_worst_ratio": 0.1, "loss_rel_diff": LOSS_RTOL / 10}


def test_within_tolerance_passes():
    assert verdict({**BASE, "train_worst_ratio": 0.9}) == ("pass", "")


def test_weights_within_the_float32_floor_are_fp32_bound():
    status, reason = verdict({**BASE, "train_worst_ratio": 3.0, "train_worst_param": "conv.weight",
                              "fp32_floor_ratio": 2.0, "fp32_floor_param": "fc.weight"})
    assert status == "fp32-bound" and status in ACCEPTED
    assert "3.0x" in reason and "conv.weight" in reason and "2.0x" in reason


def test_weights_beyond_the_float32_floor_mismatch_with_both_figures():
    status, reason = verdict({**BASE, "train_worst_ratio": FP32_FACTOR * 2.0 + 0.1, "train_worst_param": "w",
                              "fp32_floor_ratio": 2.0})
    assert status == "mismatch" and status not in ACCEPTED
    assert "4.1x" in reason and "float32 steps: 2.0x" in reason


def test_float32_floor_never_excuses_a_wrong_loss_forward_or_parameter_count():
    excused = {"train_worst_ratio": 1.5, "fp32_floor_ratio": 5.0}
    for broken in ({"loss_rel_diff": LOSS_RTOL * 10}, {"fwd_worst_ratio": 1.5}, {"params_ok": False}):
        assert verdict({**BASE, **excused, **broken})[0] == "mismatch", broken


def test_later_loss_is_excused_only_within_numpys_own_float32_loss_error():
    weights = {"train_worst_ratio": 6000.0, "train_worst_param": "bn.running_mean", "fp32_floor_ratio": 13000.0}
    later = {"loss_rel_diff": 1.5e-3, "loss1_rel_diff": LOSS_RTOL / 10}
    status, reason = verdict({**BASE, **weights, **later, "fp32_loss_floor": 1e-3})
    assert status == "fp32-bound" and "step-2 loss off by 1.5e-03" in reason and "1.0e-03" in reason
    assert verdict({**BASE, **weights, **later, "fp32_loss_floor": 1e-4})[0] == "mismatch"  # beyond 2x numpy's
    assert verdict({**BASE, **weights, **later})[0] == "mismatch"  # no float32 loss measured
    first_step_wrong = {**later, "loss1_rel_diff": LOSS_RTOL * 10}
    assert verdict({**BASE, **weights, **first_step_wrong, "fp32_loss_floor": 1e-2})[0] == "mismatch"


def test_a_float64_build_that_matches_the_oracle_makes_a_float32_miss_fp32_bound():
    miss = {"train_worst_ratio": 2.9, "train_worst_param": "conv1.weight", "fp32_floor_ratio": 0.1,
            "loss1_rel_diff": LOSS_RTOL / 10}
    status, reason = verdict({**miss, **BASE, "fp64_worst_ratio": 0.0, "fp64_loss_rel_diff": 1e-16})
    assert status == "fp32-bound" and status in ACCEPTED
    assert "2.9x" in reason and "conv1.weight" in reason and "float64 matches the oracle (0.00x" in reason
    later_loss = {**BASE, "loss_rel_diff": 2.6e-3}  # a later loss too: float64 proves the whole run
    assert verdict({**miss, **later_loss, "fp64_worst_ratio": 0.0, "fp64_loss_rel_diff": 1e-16})[0] == "fp32-bound"


def test_float64_proof_must_itself_pass_and_never_excuses_forward_parameters_or_first_loss():
    miss = {**BASE, "train_worst_ratio": 2.9, "train_worst_param": "w", "fp32_floor_ratio": 0.1,
            "loss1_rel_diff": LOSS_RTOL / 10}
    good64 = {"fp64_worst_ratio": 0.0, "fp64_loss_rel_diff": 1e-16}
    assert verdict({**miss, "fp64_worst_ratio": 1.5, "fp64_loss_rel_diff": 1e-16})[0] == "mismatch"
    assert verdict({**miss, "fp64_worst_ratio": 0.0, "fp64_loss_rel_diff": LOSS_RTOL * 10})[0] == "mismatch"
    for broken in ({"fwd_worst_ratio": 1.5}, {"params_ok": False}, {"loss1_rel_diff": LOSS_RTOL * 10}):
        assert verdict({**miss, **good64, **broken})[0] == "mismatch", broken
