"""Every kind of bad spec gives one line naming the file, the JSON path and the reason; exit 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from samenet.cli import main


def tiny(**changes):
    """A valid 122-parameter spec, with top-level keys replaced."""
    spec = {
        "name": "tiny", "title": "tiny", "year": 2020, "paper": "none", "reproduces": "nothing",
        "input": [3, 8, 8],
        "layers": [
            {"op": "conv2d", "name": "conv", "out_channels": 4, "kernel": 3, "pad": 1},
            {"op": "relu", "name": "relu"},
            {"op": "global_avgpool", "name": "gap"},
            {"op": "flatten", "name": "flat"},
            {"op": "linear", "name": "fc", "out_features": 2},
        ],
        "expect": {"params": 122, "gmacs": 6.92e-6},
    }
    spec.update(copy.deepcopy(changes))
    return spec


def with_layers(*layers, **changes):
    return tiny(layers=list(layers), **changes)


def run_validate(path, capsys):
    rc = main(["validate", str(path)])
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines()


def assert_one_line(rc, lines, path, json_path, *reason):
    assert rc == 2
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in line
    assert str(path) in line
    if json_path:
        assert f": {json_path}" in line, line
    for r in reason:
        assert r in line, line


def test_valid_spec_passes(write_spec, capsys):
    rc = main(["validate", str(write_spec(tiny()))])
    assert rc == 0
    assert "ok (tiny: 122 params" in capsys.readouterr().out


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.json"
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, None, "no such file")


def test_invalid_json(write_spec, capsys):
    path = write_spec('{"name": "tiny",\n  "title" "x"}')
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, None, "invalid JSON", "line 2")


def test_schema_violation(write_spec, capsys):
    path = write_spec(tiny(year="last year"))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.year", "schema", "'last year' is not of type 'integer'")


def test_schema_missing_field(write_spec, capsys):
    spec = tiny()
    del spec["expect"]
    rc, lines = run_validate(write_spec(spec), capsys)
    assert_one_line(rc, lines, write_spec(spec), "$", "'expect' is a required property")


def test_item_without_kind(write_spec, capsys):
    path = write_spec(with_layers({"opp": "relu"}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "an item needs one of the keys")


def test_unknown_op(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv3d", "out_channels": 4, "kernel": 3}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].op", "unknown op 'conv3d'")


def test_unknown_attribute(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "out_channels": 4, "kernal": 3}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].kernal", "unknown attribute 'kernal' for op conv2d")


def test_wrong_attribute_type(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "out_channels": 4, "kernel": "3"}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].kernel", "expected an integer or a pair of integers")


def test_wrong_bool_type(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "out_channels": 4, "kernel": 3, "bias": 1}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].bias", "expected true or false")


def test_unknown_block(write_spec, capsys):
    path = write_spec(with_layers({"block": "resblock", "args": {}}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].block", "unknown block 'resblock'")


def test_missing_block_argument_at_call(write_spec, capsys):
    blocks = {"cbr": {"args": ["out"], "body": [{"op": "conv2d", "out_channels": "$out", "kernel": 3}]}}
    path = write_spec(with_layers({"block": "cbr", "name": "b"}, blocks=blocks))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "block 'cbr' needs argument 'out'")


def test_unbound_argument_in_body(write_spec, capsys):
    blocks = {"cbr": {"args": ["out"], "body": [{"op": "conv2d", "out_channels": "$out", "kernel": "$k"}]}}
    path = write_spec(with_layers({"block": "cbr", "name": "b", "args": {"out": 4}}, blocks=blocks))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.blocks.cbr.body[0].kernel", "missing block argument 'k'", "via $.layers[0]")


def test_unknown_block_argument(write_spec, capsys):
    blocks = {"cbr": {"args": ["out"], "body": [{"op": "conv2d", "out_channels": "$out", "kernel": 3}]}}
    path = write_spec(with_layers({"block": "cbr", "args": {"out": 4, "stride": 2}}, blocks=blocks))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].args.stride", "block 'cbr' has no argument 'stride'")


@pytest.mark.parametrize("attrs, path_suffix, reason", [
    ({"out_channels": 0, "kernel": 3}, ".out_channels", "must be >= 1, got 0"),
    ({"out_channels": 4, "kernel": [0, 3]}, ".kernel", "sizes must be >= 1"),
    ({"out_channels": 4, "kernel": 3, "stride": -1}, ".stride", "sizes must be >= 1"),
    ({"out_channels": 4, "kernel": 3, "pad": -1}, ".pad", "pads must be >= 0"),
])
def test_zero_or_negative_sizes(write_spec, capsys, attrs, path_suffix, reason):
    path = write_spec(with_layers({"op": "conv2d", **attrs}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]" + path_suffix, reason)


def test_zero_input_size(write_spec, capsys):
    path = write_spec(tiny(input=[3, 0, 8]))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.input[1]", "less than the minimum of 1")


def test_kernel_larger_than_padded_input(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "name": "big", "out_channels": 4, "kernel": 11, "pad": 1}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "kernel 11 larger than padded input 10", "'big'")


def test_pool_kernel_larger_than_input(write_spec, capsys):
    path = write_spec(with_layers({"op": "maxpool2d", "kernel": 9}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "kernel 9 larger than padded input 8")


def test_mismatched_add(write_spec, capsys):
    path = write_spec(with_layers({"add": [[], [{"op": "conv2d", "out_channels": 5, "kernel": 1}]], "name": "res"}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "add inputs have different shapes: (3, 8, 8), (5, 8, 8)")


def test_mismatched_mul(write_spec, capsys):
    se = [{"op": "global_avgpool"}, {"op": "conv2d", "out_channels": 2, "kernel": 1}]
    path = write_spec(with_layers({"mul": [[], se]}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "mul inputs cannot broadcast: (3, 8, 8), (2, 1, 1)")


def test_mismatched_concat(write_spec, capsys):
    path = write_spec(with_layers({"concat": [[], [{"op": "maxpool2d", "kernel": 2}]]}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0]", "concat inputs differ outside the channel axis")


def test_dangling_reference(write_spec, capsys):
    path = write_spec(with_layers({"op": "relu", "name": "a"}, {"op": "add", "inputs": ["a", "ghost"]}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[1].inputs", "input reference 'ghost' matches no node")


def test_cyclic_reference(write_spec, capsys):
    path = write_spec(with_layers(
        {"op": "add", "name": "a", "inputs": ["input", "c"]},
        {"op": "relu", "name": "b"},
        {"op": "relu", "name": "c"},
    ))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers", "cyclic input reference", "a -> b -> c -> a")


def test_duplicate_node_name(write_spec, capsys):
    path = write_spec(with_layers({"op": "relu", "name": "act"}, {"op": "relu", "name": "act"}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[1]", "duplicate node name 'act'", "first defined at $.layers[0]")


def test_declared_params_mismatch(write_spec, capsys):
    path = write_spec(tiny(expect={"params": 123, "gmacs": 6.92e-6}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.expect.params", "declared 123 trainable parameters, inferred 122")


def test_declared_macs_mismatch(write_spec, capsys):
    path = write_spec(tiny(expect={"params": 122, "gmacs": 7.0e-6}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.expect.gmacs", "declared 7e-06 GMACs, inferred")


def test_unknown_initializer(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "out_channels": 4, "kernel": 3, "init": {"weight": "he_magic"}}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].init.weight", "unknown initializer 'he_magic'")


def test_test_input_that_changes_params(write_spec, capsys):
    path = write_spec(with_layers({"op": "flatten"}, {"op": "linear", "out_features": 2},
                                  test_input=[3, 4, 4], expect={"params": 386, "gmacs": 3.84e-7}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.test_input", "test_input changes parameter 1.weight")


def test_several_files_all_reported(write_spec, tmp_path, capsys):
    good = write_spec(tiny(name="good"), "good.json")
    rc = main(["validate", str(good), str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr()
    assert rc == 2
    assert len(out.err.strip().splitlines()) == 2
    assert "good.json: ok" in out.out


def test_info_on_bad_spec_is_one_line(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv3d"}))
    rc = main(["info", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown op 'conv3d'" in err[0]


def test_default_init_applies_only_to_existing_parameters(write_spec, capsys):
    spec = tiny(defaults={"conv2d": {"bias": False, "init": {"weight": "glorot_uniform", "bias": "zeros"}}},
                expect={"params": 118, "gmacs": 6.92e-6})
    rc = main(["validate", str(write_spec(spec))])
    assert rc == 0, capsys.readouterr().err


def test_node_init_for_missing_parameter_is_an_error(write_spec, capsys):
    path = write_spec(with_layers({"op": "conv2d", "out_channels": 4, "kernel": 3, "bias": False,
                                   "init": {"bias": "zeros"}}))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].init", "init for unknown parameter 'bias' of conv2d")


def test_validate_skips_the_schema_file(capsys):
    from samenet.spec import SCHEMA_PATH

    assert main(["validate", str(SCHEMA_PATH)]) == 0
    assert "skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------- names, families, initialisers


def test_name_must_match_the_file_name(write_spec, capsys):
    path = write_spec(tiny(), name="copied.json")
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.name", "name 'tiny' differs from the file name 'copied'", "rename")


def test_kaiming_has_no_fan_avg(write_spec, capsys):
    layers = tiny()["layers"]
    layers[0]["init"] = {"weight": {"kind": "kaiming_normal", "mode": "fan_avg"}}
    path = write_spec(tiny(layers=layers))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].init.weight", "kaiming_normal argument 'mode' must be one of",
                    "fan_avg")


def test_a_family_member_extends_its_base(write_spec, capsys):
    write_spec(tiny(args={"width": 4}, layers=[
        {"op": "conv2d", "name": "conv", "out_channels": "$width", "kernel": 3, "pad": 1},
        {"op": "global_avgpool", "name": "gap"}, {"op": "flatten", "name": "flat"},
        {"op": "linear", "name": "fc", "out_features": 2}], aliases=["tiny_alias"]))
    wide = write_spec({"extends": "tiny", "name": "wide", "title": "wide", "args": {"width": 8},
                       "expect": {"params": 242, "gmacs": 1.38e-5}}, name="wide.json")
    assert main(["validate", str(wide)]) == 0, capsys.readouterr().err
    assert "ok (wide: 242 params" in capsys.readouterr().out
    from samenet.spec import read_document

    doc = read_document(wide)
    assert doc["extends"] == "tiny" and "aliases" not in doc and doc["paper"] == "none"


@pytest.mark.parametrize("extends, reason", [
    ("nothere", "extends 'nothere': no spec file"),
    ("loop", "extends 'loop': "),
    (7, "extends names a spec file in the same folder, got 7"),
])
def test_bad_extends_is_one_line(write_spec, capsys, extends, reason):
    write_spec({"extends": "loop2", "name": "loop"}, name="loop.json")
    write_spec({"extends": "loop", "name": "loop2"}, name="loop2.json")
    path = write_spec({**tiny(name="child"), "extends": extends}, name="child.json")
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.extends", reason)
    if extends == "loop":
        assert "extends cycle: child -> loop -> loop2 -> loop" in lines[0]


def test_an_initializer_argument_the_kind_ignores_is_an_error(write_spec, capsys):
    layers = tiny()["layers"]
    layers[0]["init"] = {"weight": {"kind": "kaiming_uniform", "a": 0.2, "nonlinearity": "relu"}}
    path = write_spec(tiny(layers=layers))
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, "$.layers[0].init.weight", "argument 'a' applies to nonlinearity leaky_relu only")


@pytest.mark.parametrize("args, reason", [
    (["--workers", "2", "--modes", "infer"], "data-parallel cells train"),
    (["--workers", "2", "--modes", "train", "--backends", "numpy"], "backend numpy declares no data-parallel"),
    (["--workers", "2", "--modes", "train", "--threads", "64"], "exceeds the core budget"),
    (["--workers", "3", "--modes", "train", "--scaling", "strong", "--batch-sizes", "16"], "does not split evenly"),
    (["--workers", "0", "--modes", "train"], "--workers: expected positive integers"),
    (["--workers", "2", "--modes", "train", "--hosts", "127.0.0.1,127.0.0.1"], "needs --node-rank"),
    (["--workers", "2", "--modes", "train", "--node-rank", "1"], "--node-rank: only with --hosts"),
    (["--workers", "2", "--modes", "train", "--hosts", "a"], "two or more comma-separated addresses"),
    (["--workers", "3", "--modes", "train", "--hosts", "a,b", "--node-rank", "0", "--rendezvous-port", "29500"],
     "--workers 3 does not split evenly over 2 hosts"),
    (["--workers", "1,2", "--modes", "train", "--hosts", "a,b", "--node-rank", "0", "--rendezvous-port", "29500"],
     "--workers 1 does not split evenly"),
    (["--workers", "2", "--modes", "train", "--hosts", "a,b", "--node-rank", "2", "--rendezvous-port", "29500"],
     "--node-rank: must be 0..1"),
    (["--workers", "2", "--modes", "train", "--hosts", "a,b", "--node-rank", "0", "--rendezvous-port", "80"],
     "--rendezvous-port: must be 1024"),
    (["--workers", "2", "--modes", "train", "--hosts", "a,b", "--node-rank", "0", "--rendezvous-port", "29500",
      "--executor", "ray"], "--hosts: only with --executor local"),
    (["--workers", "4", "--modes", "train", "--hosts", "a,b", "--node-rank", "0", "--rendezvous-port", "29500",
      "--threads", "64"], "2 ranks on each of 2 hosts"),
])
def test_bad_data_parallel_options_are_one_line(args, reason, tmp_path, capsys):
    rc = main(["run", "--models", "lenet5", "--results", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and reason in err[0], err


def test_parity_workers_must_be_positive(tmp_path, capsys):
    rc = main(["parity", "--workers", "0", "--backends", "numpy", "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--workers: must be positive" in err[0], err


def test_parity_jobs_must_be_positive(tmp_path, capsys):
    rc = main(["parity", "--jobs", "0", "--backends", "numpy", "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--jobs: must be positive" in err[0], err


@pytest.mark.parametrize("argv, reason", [
    (["run", "--timeout", "0"], "--timeout: must be a positive number of seconds"),
    (["run", "--timeout", "-5"], "--timeout: must be a positive number of seconds"),
    (["parity", "--timeout", "inf", "--backends", "numpy"], "--timeout: must be a positive number of seconds"),
    (["train", "--timeout", "soon", "--backends", "numpy"], "--timeout: expected seconds"),
    (["run", "--models", ""], "--models: empty list"),
    (["parity", "--models", "", "--backends", "numpy"], "--models: empty list"),
    (["train", "--models", " , ", "--backends", "numpy"], "--models: empty list"),
])
def test_bad_timeouts_and_empty_model_lists_are_one_line(argv, reason, tmp_path, capsys):
    rc = main([*argv, "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and reason in err[0], err


BAD_SPECS = json.loads((Path(__file__).parent.parent / "data" / "bad_specs.json").read_text())["specs"]


@pytest.mark.parametrize("case", BAD_SPECS, ids=[c["name"] for c in BAD_SPECS])
def test_the_corpus_of_bad_specs_gives_one_line_each(case, tmp_path, capsys):
    path = tmp_path / case["name"] / "tiny.json"  # the corpus's specs are all named tiny
    path.parent.mkdir()
    path.write_text(case["text"])
    rc, lines = run_validate(path, capsys)
    assert_one_line(rc, lines, path, None, case["error"])
