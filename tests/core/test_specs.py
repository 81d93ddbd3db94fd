"""Every spec in the registry: valid, counts equal to the reference table, runnable."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from samenet import reference, zoo
from samenet.errors import UsageError

ZOO_CSV = Path(__file__).resolve().parents[1] / "data" / "zoo.csv"  # shared/reference/zoo.csv plus resnet50_sd
REFERENCE = {row["model"]: row for row in csv.DictReader(ZOO_CSV.open())}
MODELS = zoo.names()


@pytest.mark.parametrize("model", MODELS)
def test_spec_is_valid(model):
    ir = zoo.validate(model)
    assert ir.name == model
    assert ir.meta["title"] and ir.meta["paper"] and ir.meta["reproduces"] and ir.meta["year"]


@pytest.mark.parametrize("model", MODELS)
def test_counts_equal_reference_table(model):
    ir = zoo.load(model)
    assert model in REFERENCE, (f"{model} has no row in tests/data/zoo.csv (a copy of shared/reference/zoo.csv): "
                                "add the reference implementation's counts there")
    row = REFERENCE[model]
    assert ir.trainable_params == int(row["trainable_params"])
    # Within 0.5%, or within the rounding of the table's printed digits: torchvision's meta has
    # 3 decimals, so 0.057 stands for 0.0565..0.0575 (mobilenet_v3_small is 0.05651).
    decimals = len(row["gmacs"].partition(".")[2])
    allowed = max(0.005 * float(row["gmacs"]), 0.5 * 10 ** -decimals)
    assert abs(ir.macs / 1e9 - float(row["gmacs"])) <= allowed
    assert "x".join(map(str, ir.input_shape)) == row["input_chw"]


@pytest.mark.parametrize("model", MODELS)
def test_reference_runs_at_test_input(model):
    ir = zoo.load_for_test(model)
    rng = np.random.default_rng(0)  # cheap weights: this checks that the graph executes
    w = {p.name: rng.standard_normal(p.shape, dtype=np.float32) / np.sqrt(p.fan_in) for p in ir.params.values()}
    w.update({k: 1 + np.abs(v) for k, v in w.items() if k.endswith("running_var")})
    x = np.random.default_rng(0).standard_normal((1, *ir.input_shape))
    out = reference.run(ir, w, x).outputs[0]
    assert out.shape == (1, *ir.output_shape)
    assert np.all(np.isfinite(out))


SPEC_LINE_LIMIT = 200


@pytest.mark.parametrize("model", MODELS)
def test_specs_stay_short(model):
    # Blocks, repetition and families keep the deepest networks readable.
    lines = zoo.path_of(model).read_text().count("\n")
    assert lines < SPEC_LINE_LIMIT, (
        f"{model}: {lines} lines, the limit is {SPEC_LINE_LIMIT}: move repeated layers into a block called with "
        "repeat, or write the spec as a family member (\"extends\": BASE) over the spec it varies")


FAMILIES = {"resnet101": "resnet50", "resnet152": "resnet50", "resnet50_sd": "resnet50", "resnet34": "resnet18",
            **{f"vgg{d}": "vgg11" for d in (13, 16, 19)}, **{f"vgg{d}_bn": f"vgg{d}" for d in (11, 13, 16, 19)}}


@pytest.mark.parametrize("model, base", sorted(FAMILIES.items()))
def test_family_members_are_short_files_over_their_base(model, base):
    doc, _ = zoo.document(model)
    assert doc["extends"] == base
    assert zoo.path_of(model).read_text().count("\n") < 40
    assert zoo.load(model).name == model and not set(doc.get("aliases", [])) & set(zoo.document(base)[0].get("aliases", []))


def test_the_ci_forward_selection_leaves_out_only_variants_of_kept_specs():
    from samenet.conformance import CI_FORWARD_SKIPPED, forward_models

    kept = forward_models("ci")
    assert set(kept) | set(CI_FORWARD_SKIPPED) == set(zoo.names()) and len(kept) == len(zoo.names()) - len(CI_FORWARD_SKIPPED)
    for skipped, representative in CI_FORWARD_SKIPPED.items():
        assert representative in kept, skipped
        ir, rep = zoo.load(skipped), zoo.load(representative)
        assert {n.op for n in ir.nodes} == {n.op for n in rep.nodes}, f"{skipped} uses ops {representative} lacks"
    assert forward_models("all") == zoo.names()
    with pytest.raises(UsageError, match="--forward-models: unknown spec"):
        forward_models("lenet5,nonet")
