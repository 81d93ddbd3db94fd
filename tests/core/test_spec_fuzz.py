"""Mutated real specs: validate either accepts one or gives one line and exit 2, never a traceback."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samenet.cli import main
from samenet.ops import OPS

SPECS = Path(__file__).resolve().parents[2] / "specs"
# Specs that extend none (a copy elsewhere must stand alone) and between them use blocks,
# repeats, sequences, every merge and most of the op table.
BASES = {name: json.loads((SPECS / f"{name}.json").read_text())
         for name in ("lenet5", "alexnet", "resnet18", "mobilenet_v2", "squeezenet1_1", "googlenet_aux",
                      "shufflenet_v2_x1_0", "mobilenet_v3_small", "efficientnet_b0")}
_counter = itertools.count()


def _keys(value, out=None):
    out = set() if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(value, list):
        for v in value:
            _keys(v, out)
    return out


KEYS = sorted(set().union(*(_keys(doc) for doc in BASES.values())))
SCALARS = (st.none() | st.booleans() | st.integers(-(10 ** 6), 10 ** 6) | st.integers(-(10 ** 30), 10 ** 30)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
           | st.sampled_from([0, -1, 1, 2, 1e-300, 1e300, "", " x", "$", "$w", "$missing", *sorted(OPS)]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3),
                      max_leaves=6)


def _containers(value, path=()):
    """Every (path, container) in a document, the document itself first."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _containers(v, (*path, k))


@st.composite
def mutated_specs(draw) -> tuple[str, str]:
    """A real spec's name and its text with one to three mutations of its tree, or cut and spliced."""
    name = draw(st.sampled_from(sorted(BASES)))
    doc = json.loads(json.dumps(BASES[name]))
    for _ in range(draw(st.integers(1, 3))):
        places = list(_containers(doc))
        _, box = draw(st.sampled_from(places))
        how = draw(st.sampled_from(["replace", "delete", "insert", "duplicate"]))
        if isinstance(box, dict):
            key = draw(st.sampled_from(sorted(box)) if box and how != "insert" else st.sampled_from(KEYS))
            if how == "delete":
                box.pop(key, None)
            elif how == "duplicate" and key in box:
                box[draw(st.sampled_from(KEYS))] = json.loads(json.dumps(box[key]))
            else:
                box[key] = draw(VALUES)
        elif isinstance(box, list):
            i = draw(st.integers(0, max(len(box) - 1, 0)))
            if how == "delete" and box:
                box.pop(i)
            elif how == "duplicate" and box:
                box.insert(i, json.loads(json.dumps(box[i])))
            elif how == "insert" or not box:
                box.insert(i, draw(VALUES))
            else:
                box[i] = draw(VALUES)
    text = json.dumps(doc, indent=1)
    if draw(st.integers(0, 4)) == 0:  # a damaged file rather than a wrong tree
        a = draw(st.integers(0, len(text)))
        b = draw(st.integers(a, min(len(text), a + 40)))
        text = text[:a] + draw(st.sampled_from(["", "{", "]", ",", '"', "\\", "\x00", "1e999", "NaN"])) + text[b:]
    return name, text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(spec=mutated_specs())
def test_a_mutated_spec_is_accepted_or_refused_in_one_line(spec, tmp_path, capsys):
    name, text = spec
    path = tmp_path / str(next(_counter)) / f"{name}.json"  # a fresh path: no cache can answer for it
    path.parent.mkdir()
    path.write_text(text)
    rc = main(["validate", str(path)])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    if rc == 0:
        assert "ok (" in out.out and not lines, (out.out, lines)
    else:
        assert rc == 2 and len(lines) == 1 and str(path) in lines[0] and "Traceback" not in lines[0], lines
