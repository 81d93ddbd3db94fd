"""Training-parity cases: near-tie alternatives are computed lazily and cached as windows."""

import numpy as np

from samenet import conformance
from samenet import init, probe
from samenet.conformance import TRAIN_STEPS, _oracle, model_training_case
from samenet.ir import build_ir


def _maxpool_case():
    """Two oracle steps of a conv under a 2x2 max pool: a flipped window moves the conv's gradient."""
    ir = build_ir({"name": "conv_pool", "input": [2, 6, 6], "layers": [
        {"op": "conv2d", "name": "conv", "out_channels": 3, "kernel": 3, "pad": 1},
        {"op": "maxpool2d", "name": "pool", "kernel": 2},
        {"op": "flatten", "name": "logits"}]}, "test")
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    y = np.arange(4)
    return _oracle("conv_pool", ir, probe.probe_weights(ir, 0), x, y, 0, True)


def test_alternatives_are_computed_only_when_asked_for_and_differ_where_flipped():
    case = _maxpool_case()
    case.tie_windows = [[("pool", 0, 0, 0, 0)], [("pool", 1, 1, 1, 1)]]
    assert len(case.flip_sets()) == 3  # every non-empty combination of the two windows
    trajectories = case.trajectories()
    losses, steps = next(trajectories)
    assert case._alternatives == []  # the oracle's own trajectory costs nothing more
    alternatives = list(trajectories)
    assert len(alternatives) == 3 and len(case._alternatives) == 3
    differs = lambda a, b: any(not np.array_equal(a[n], b[n]) for n in b)  # noqa: E731
    second_only, first_only = alternatives[0][1], alternatives[1][1]  # itertools.product order
    assert not differs(second_only[0], steps[0]) and differs(second_only[1], steps[1])
    assert differs(first_only[0], steps[0])
    assert [a for a in case.trajectories()][1:] == case._alternatives[:]  # kept, not recomputed


def test_too_many_near_ties_give_no_alternatives():
    case = _maxpool_case()
    case.tie_windows = [[("pool", 0, 0, i, 0) for i in range(conformance.MAX_FLIPPED + 1)], []]
    assert case.flip_sets() == [] and len(list(case.trajectories())) == 1


def test_the_disk_cache_keeps_tie_windows_not_trajectories(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMENET_CACHE", str(tmp_path))
    real = conformance._tie_free_case
    windows = [[("pool1", 0, 1, 2, 3)], [("pool2", 1, 0, 0, 1), ("pool1", 3, 2, 1, 0)]]

    def with_ties(*args, **kwargs):
        case = real(*args, **kwargs)
        case.tie_windows = windows
        return case

    monkeypatch.setattr(conformance, "_tie_free_case", with_ties)
    made = model_training_case("lenet5")
    files = list((tmp_path / "training").glob("lenet5-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as f:
        assert not any(k.startswith("a") for k in f.files)  # no alternative trajectories on disk
    loaded = model_training_case("lenet5")
    assert loaded.tie_windows == windows and loaded.near_ties == 3 and len(loaded.tie_windows) == TRAIN_STEPS
    assert loaded.losses == made.losses
    assert all(np.array_equal(loaded.steps[-1][n], made.steps[-1][n]) for n in made.steps[-1])


def _flipped_run(case, flips):
    """What a float32 run that resolved ``flips`` (per step) the other way reports: its weights."""
    run = _oracle(case.id, case.ir, case.weights, case.x, case.y, 0, True, flips, case.optimizer, case.masks)
    return case.weights, run.steps


def test_fitted_flips_read_a_runs_tie_resolutions_off_its_updates(monkeypatch):
    # Every window of the pool counts as a near-tie here: a run that flipped two of them (one
    # per step) is told apart from the other single flips (108 windows a step) and their combinations.
    monkeypatch.setattr(conformance, "TIE_FIT_RTOL", 10.0)
    case = _maxpool_case()
    flips = [[("pool", 1, 2, 0, 1)], [("pool", 3, 0, 2, 2)]]
    assert conformance.fitted_flips(case, *_flipped_run(case, flips)) == flips
    assert conformance.fitted_flips(case, *_flipped_run(case, [[], []])) == [[], []]


def test_the_fitted_trajectory_comes_last_and_only_when_new(monkeypatch):
    monkeypatch.setattr(conformance, "TIE_FIT_RTOL", 10.0)
    case = _maxpool_case()
    start, steps = _flipped_run(case, [[("pool", 0, 1, 1, 0)], []])
    *_, (_, last) = case.trajectories((start, steps))
    assert case.fitted == [[("pool", 0, 1, 1, 0)], []]
    assert all(np.array_equal(last[k][n], steps[k][n]) for k in range(TRAIN_STEPS) for n in steps[k])
    assert len(list(case.trajectories(_flipped_run(case, [[], []])))) == 1  # the oracle's own: nothing new


def test_fitted_flips_are_near_ties_only():
    case = _maxpool_case()  # no window of this batch is within TIE_FIT_RTOL of a tie
    start, steps = _flipped_run(case, [[("pool", 1, 2, 0, 1)], []])
    assert conformance.fitted_flips(case, start, steps) == [[], []]


def test_a_malformed_floor_cache_is_a_miss_and_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMENET_CACHE", str(tmp_path))
    case = _maxpool_case()
    fresh = conformance.fp32_floor(case)
    (written,) = (tmp_path / "floor").glob("*.json")
    for bad in ("", "{not json", "[]", '{"weights": "x", "later_loss": 0.0}', '{"weights": 1.0}'):
        written.write_text(bad)
        assert conformance.fp32_floor(case) == fresh, bad
        assert conformance._read_floor_cache(written) is not None  # recomputed and written again


def test_writing_a_case_deletes_only_other_code_versions_cases(tmp_path):
    current = conformance.code_version()
    other = "0123456789"
    stale = tmp_path / f"lenet5-abcdef-s0-b2-{other}.npz"
    kept = [tmp_path / f"lenet5-abcdef-s0-b2-{current}.npz",
            tmp_path / f"lenet5-abcdef-s0-b2-{other}.npz.123.tmp.npz",  # another process still writing
            tmp_path / "notes-by-hand.npz"]
    for path in [stale, *kept]:
        np.savez(path, a=np.zeros(1))
    conformance.save_arrays(tmp_path / f"resnet18-abcdef-s0-b2-{current}.npz", {"a": np.ones(2)})
    assert not stale.exists()
    assert all(path.exists() for path in kept)
    assert (tmp_path / f"resnet18-abcdef-s0-b2-{current}.npz").exists()
