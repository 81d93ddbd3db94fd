"""Findings: claims of the literature about frameworks and networks, checked against bench rows.

A claim is data (``CLAIMS``): an id, its text, where it comes from and a function that turns
rows into a ``Finding``: a verdict, the numbers behind it and the configurations it holds and
does not hold for. Only rows with status ``ok`` count, and two rows are compared only when they
share a configuration (``CONFIG``: model, mode, batch, input, device, precision, threads, CPU
settings, workers and machine class); repeats are summarised by their median. A claim whose
rows are missing is a finding too ("cannot be decided: no rows of mxnet"), never left out.

Pairwise claims ("A uses less memory than B") count a configuration as a win when A's value is
below B's by more than ``TIE`` (5 %), a loss when above by more, a tie otherwise. The verdict
is "holds" when every comparison is a win, "does not hold" when none is, "mixed" otherwise.

Framework-free: pandas and the harness's tables only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

HOLDS, FAILS, MIXED, UNDECIDED = "holds", "does not hold", "mixed", "cannot be decided"
TIE = 0.05
# The memory the findings and the report's memory chart use: the cell's peak RSS over its
# post-import baseline, i.e. what building and running the network cost, without the
# framework's own import footprint (which differs by hundreds of MB and says nothing of a model).
MEMORY = "rss_increase_mb"
CONFIG = ("model", "mode", "batch", "input", "device", "precision", "threads", "cpu_settings", "workers",
          "machine_class")
VALUES = ("step_median_s", "samples_per_s", "gflops_per_s", MEMORY, "macs_per_sample", "params")
REFERENCE = ("numpy",)  # not a framework: never a side of a framework claim
SHOWN = 8  # configurations listed per finding before "and N more"


@dataclass(frozen=True)
class Claim:
    """A claim of the literature and how rows decide it.

    Attributes:
        id: Short stable name (``mxnet_memory``).
        text: The claim, as the literature makes it.
        source: Where it comes from.
        evaluate: Summarised rows (``summarise``) -> Finding.
    """

    id: str
    text: str
    source: str
    evaluate: Callable[["pd.DataFrame", "Claim"], "Finding"] = field(repr=False)  # noqa: F821


@dataclass
class Finding:
    """What the rows say about one claim."""

    claim: Claim
    verdict: str
    numbers: str
    holds_for: list[str] = field(default_factory=list)
    fails_for: list[str] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        """One line for the terminal."""
        return f"{self.claim.id}: {self.verdict}" + (f": {self.numbers}" if self.numbers else "") \
            + (f" ({self.note})" if self.note else "")


def summarise(rows):
    """One line per backend variant and configuration: the median of its ok rows' values.

    Args:
        rows: Bench rows (``samenet.results.load``), any statuses and repeats.

    Returns:
        DataFrame with ``backend``, ``variant`` (backend, plus exec mode/options when the
        backend ran several), the ``CONFIG`` columns and the ``VALUES`` columns.
    """
    import pandas as pd

    from . import tables

    columns = ["backend", "variant", *CONFIG, *VALUES]
    if rows is None or rows.empty or "status" not in rows:
        return pd.DataFrame(columns=columns)
    ok = rows[rows["status"] == tables.OK]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    ok = tables.prepare(tables.newest(ok, "bench"))
    for c in (*CONFIG, *VALUES[:-1], "params_trainable", "params_non_trainable"):
        if c not in ok:
            ok[c] = None
    ok["workers"] = ok["workers"].fillna(1)
    ok["params"] = (pd.to_numeric(ok["params_trainable"], errors="coerce").fillna(0)
                    + pd.to_numeric(ok["params_non_trainable"], errors="coerce").fillna(0))
    ok["params"] = ok["params"].where(ok["params"] > 0)
    keys = ["backend", "variant", *CONFIG]
    text = ok[keys].astype(str)
    values = ok[list(VALUES)].apply(pd.to_numeric, errors="coerce")
    out = values.groupby([text[k] for k in keys]).median().reset_index()
    return out[columns]


def _label(r, varying: list[str]) -> str:
    extra = "".join(f", {k} {r[k]}" for k in varying)
    return f"{r['model']} {r['mode']} b{r['batch']}{extra}"


def _varying(df) -> list[str]:
    return [c for c in CONFIG if c not in ("model", "mode", "batch", "input") and df[c].nunique() > 1]


def _names(backends) -> str:
    backends = list(backends)
    return backends[0] if len(backends) == 1 else ", ".join(backends[:-1]) + " or " + backends[-1]


def _shown(items: list[str]) -> list[str]:
    return items if len(items) <= SHOWN else [*items[:SHOWN], f"and {len(items) - SHOWN} more"]


def compare_pairs(table, claim: Claim, side: str, others, column: str, quantity: str,
                  note: str = "") -> Finding:
    """Finding of "``side`` has a lower ``column`` than each of ``others`` on the same configuration".

    Args:
        table: ``summarise`` output.
        claim: The claim decided.
        side: The backend the claim is about.
        others: The backends it is compared with.
        column: The value compared (lower is the claim's direction).
        quantity: What the value is, in words ("step time").
        note: Added to the finding (what the comparison means or leaves out).
    """
    import numpy as np

    others = [b for b in others if b != side]
    present = set(table["backend"])
    if side not in present:
        return Finding(claim, UNDECIDED, f"no rows of {side}", note=note)
    if not present & set(others):
        return Finding(claim, UNDECIDED, f"no rows of {_names(others)}", note=note)
    mine = table[(table["backend"] == side) & table[column].notna()]
    theirs = table[table["backend"].isin(others) & table[column].notna()]
    pairs = mine.merge(theirs, on=list(CONFIG), suffixes=("_a", "_b"))  # CONFIG values are text
    pairs = pairs[(pairs[f"{column}_a"] > 0) & (pairs[f"{column}_b"] > 0)]
    if pairs.empty:
        return Finding(claim, UNDECIDED, f"no configuration with {quantity} of both {side} and {_names(others)} "
                                         "(same model, mode, batch, precision, device, threads, machine class)",
                       note=note)
    ratio = pairs[f"{column}_a"] / pairs[f"{column}_b"]
    wins, losses = ratio <= 1 - TIE, ratio >= 1 / (1 - TIE)
    varying = _varying(pairs)
    labels = [f"{_label(r, varying)}: {r['variant_a']} {x:.2f}x {r['variant_b']}"
              for (_, r), x in zip(pairs.iterrows(), ratio)]
    n, n_wins, n_losses = len(pairs), int(wins.sum()), int(losses.sum())
    per_other = []
    for b, g in ratio.groupby(pairs["backend_b"]):
        per_other.append(f"vs {b}: geometric mean {math.exp(np.log(g).mean()):.2f}x, "
                         f"lower in {int((g <= 1 - TIE).sum())} of {len(g)}")
    numbers = (f"{quantity} of {side} / other: geometric mean {math.exp(np.log(ratio).mean()):.2f}x, range "
               f"{ratio.min():.2f}x-{ratio.max():.2f}x; lower (by > {TIE:.0%}) in {n_wins} of {n} configurations, "
               f"higher in {n_losses}, within {TIE:.0%} in {n - n_wins - n_losses} ({'; '.join(per_other)})")
    verdict = HOLDS if n_wins == n else FAILS if n_wins == 0 else MIXED
    return Finding(claim, verdict, numbers, _shown([t for t, w in zip(labels, wins) if w]),
                   _shown([t for t, w in zip(labels, wins) if not w]), note)


def _mxnet_memory(table, claim):
    others = sorted(set(table["backend"]) - {"mxnet", *REFERENCE})
    return compare_pairs(table, claim, "mxnet", others or ["any other framework"], MEMORY,
                         "memory (peak RSS over the post-import baseline)")


def _torch_fastest(table, claim):
    return compare_pairs(table, claim, "torch", ["tf", "keras-torch", "keras-jax"], "step_median_s", "step time")


KERAS_NOTE = ("keras-torch is compared with torch, the same engine without Keras; keras-jax has no native JAX "
              "backend here and the tf backend is itself a Keras 3 model on TensorFlow, so the rows cannot decide "
              "the claim for them")


def _keras_slow(table, claim):
    # The claim is "Keras is slower than its engine": torch's step time below keras-torch's.
    return compare_pairs(table, claim, "torch", ["keras-torch"], "step_median_s", "step time", KERAS_NOTE)


def _per_configuration_extreme(table, column: str, same_backend: bool = True):
    """(configuration label, the model with the largest value, the models compared) per configuration.

    Models are compared within one backend variant and configuration other than the model
    (``same_backend``), or once over the whole table for values of the spec (parameters, MACs);
    a configuration of fewer than two models decides nothing and is left out.
    """
    keys = ["variant", *[c for c in CONFIG if c not in ("model", "input")]] if same_backend else []
    shown = [k for k in keys if k in ("variant", "mode", "batch") or table[k].nunique() > 1]
    out = []
    data = table[table[column].notna()]
    for key, g in (data.groupby(keys) if keys else [((), data)]):
        g = g.groupby("model")[column].median()
        if len(g) < 2:
            continue
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(f"b{v}" if name == "batch" else str(v) if name in ("variant", "mode") else f"{name} {v}"
                         for v, name in zip(key, keys) if name in shown)
        out.append((label or "the specs", g.idxmax(), set(g.index)))
    return out


def _vgg_heaviest(table, claim):
    if table.empty:
        return Finding(claim, UNDECIDED, "no ok bench rows")
    models = sorted(table["model"].unique())
    if not any(m.startswith("vgg") for m in models):
        return Finding(claim, UNDECIDED, "no rows of a VGG network")
    if len(models) < 2:
        return Finding(claim, UNDECIDED, "only one network measured")
    holds, fails, parts = [], [], []
    for column, quantity, per_config in (("params", "parameters", False), ("macs_per_sample", "MACs", False),
                                         ("step_median_s", "step time", True), (MEMORY, "memory", True)):
        extremes = _per_configuration_extreme(table, column, per_config)
        if not extremes:
            parts.append(f"{quantity}: no comparable configuration")
            continue
        vgg = [(label, m) for label, m, _ in extremes if m.startswith("vgg")]
        parts.append(f"{quantity}: a VGG is the largest in {len(vgg)} of {len(extremes)}")
        for label, m, n in extremes:
            (holds if m.startswith("vgg") else fails).append(f"{quantity}, {label}: {m} largest of {len(n)}")
    decided = holds + fails
    verdict = UNDECIDED if not decided else HOLDS if not fails else FAILS if not holds else MIXED
    return Finding(claim, verdict, f"{len(models)} networks measured; " + "; ".join(parts), _shown(holds),
                   _shown(fails), "among the networks measured only; step time and memory per backend and "
                                  "configuration, each network at its own input size")


GOOGLENET_NOTE = ("the literature's efficiency is accuracy per operation (or per parameter): timing rows have no "
                  "accuracy, so they cannot decide it; what they measure is how fast each network's operations run "
                  "(achieved GFLOP/s)")


def _googlenet_efficient(table, claim):
    if table.empty or "googlenet" not in set(table["model"]):
        return Finding(claim, UNDECIDED, "no rows of googlenet", note=GOOGLENET_NOTE)
    # Only configurations where googlenet was measured beside another network.
    extremes = [e for e in _per_configuration_extreme(table, "gflops_per_s") if "googlenet" in e[2]]
    if not extremes:
        return Finding(claim, UNDECIDED, "no configuration with googlenet and another network", note=GOOGLENET_NOTE)
    holds = [f"{label}: googlenet highest of {len(n)}" for label, m, n in extremes if m == "googlenet"]
    fails = [f"{label}: {m} highest of {len(n)}" for label, m, n in extremes if m != "googlenet"]
    verdict = HOLDS if not fails else FAILS if not holds else MIXED
    return Finding(claim, verdict, f"achieved GFLOP/s: googlenet the highest in {len(holds)} of {len(extremes)} "
                                   "configurations (per backend, mode and batch)",
                   _shown(holds), _shown(fails), GOOGLENET_NOTE)


CANZIANI = ("Canziani, Paszke, Culurciello 2016: An Analysis of Deep Neural Network Models for Practical "
            "Applications (arXiv:1605.07678)")
CLAIMS = (
    Claim("mxnet_memory", "MXNet uses less memory for the same model",
          "MXNet's design paper (Chen et al. 2015: memory-saving graph allocation) and framework comparisons that "
          "repeat it", _mxnet_memory),
    Claim("torch_faster", "PyTorch is faster than TensorFlow and Keras",
          "framework comparisons and benchmark posts", _torch_fastest),
    Claim("keras_slow", "Keras' encapsulation makes it slow",
          "framework comparisons: Keras as a high-level wrapper costs speed over its engine", _keras_slow),
    Claim("vgg_heaviest", "VGG is the heaviest network (parameters, operations, time, memory)", CANZIANI,
          _vgg_heaviest),
    Claim("googlenet_efficient", "GoogLeNet is the most efficient network", CANZIANI, _googlenet_efficient),
)


def evaluate(rows, claims=CLAIMS) -> list[Finding]:
    """Every claim's finding from bench rows (of any store written by ``samenet run``)."""
    table = summarise(rows)
    return [c.evaluate(table, c) for c in claims]
