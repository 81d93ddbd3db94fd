"""What the conformance suite runs, built without any framework.

Op cases come from the op table (each op's ``cases``, as ONNX's node tests); model cases from
the spec registry at each spec's test input. Each case carries its IR, calibrated probe
weights (samenet.probe.probe_weights), an input batch and the float64 reference outputs; a
backend's fp32 result must equal them within RTOL and ATOL.

Scale matters for a fixed ATOL: op cases run at unit scale. Model cases calibrate their
logits to a standard deviation of MODEL_OUTPUT_STD (0.1): fp32 rounding grows by about 1e-6
of the signal per layer, so over the 100-plus layers of an Inception-v4 it reaches 1e-4 of
the logits, and unit-scale logits would test fp32 rounding against ATOL instead of testing
that the networks are the same. At 0.1 the check still fails on any wiring, layout or
convention error (those change logits by 1e-3 of their scale or far more), while the
numerical noise stays several times under the tolerance.

Model cases are cached on disk (keyed by the IR's fingerprint) so that the five backend
envs compute each reference once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import grads, init, probe, reference, zoo
from .backend import Optimizer
from .errors import UsageError
from .init import stream
from .ir import IR, build_ir
from .ops import OPS
from .results import file_safe

RTOL = 1e-4
ATOL = 1e-5
MODEL_OUTPUT_STD = 0.1
_CASE_SOURCES = ("ops.py", "init.py", "probe.py", "grads.py", "reference.py", "graph.py", "conformance.py", "ir.py",
                 "spec.py", "dp_parity.py")


def code_version() -> str:
    """Hash of the modules that make the cases: a cached case is only reused by the same code."""
    import hashlib

    h = hashlib.sha256()
    for name in _CASE_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:10]
CACHE_LIMIT_PARAMS = 200_000_000
"""Models up to this size are cached: every spec of the zoo (VGG-19-BN, 144M parameters, is a
575 MB case file). Recomputing instead costs each backend env the VGG family's float64 oracle,
mostly drawing the 100M-parameter classifier's weights, 15-20 s per spec per env."""


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes a case file atomically, keeping every array's dtype (labels stay integers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: parity runs backends in parallel processes that may
    # write the same case at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    prune_stale_cases(path.parent)


def prune_stale_cases(folder: Path) -> None:
    """Deletes the case files in ``folder`` written by another code version.

    Every code change keys a new set of cases (several GB for the zoo); older ones are never
    read again. A name ends with its writer's code version (``...-<10 hex>.npz``)."""
    current = code_version()
    for path in folder.glob("*.npz"):
        version = path.name[:-len(".npz")].rsplit("-", 1)[-1]
        if version != current and len(version) == len(current) and all(c in "0123456789abcdef" for c in version):
            path.unlink(missing_ok=True)


def cache_dir() -> Path:
    """``$SAMENET_CACHE``, else ``~/.cache/samenet``."""
    return Path(os.environ.get("SAMENET_CACHE") or Path.home() / ".cache" / "samenet")


@dataclass
class Case:
    """One conformance case."""

    id: str
    ir: IR
    weights: dict[str, np.ndarray]
    x: np.ndarray
    expected: list[np.ndarray]


def op_case_ids() -> list[tuple[str, str, dict]]:
    """(test id ``op:NAME/CASE``, op, case) for every case of every op."""
    out = []
    for name, op in OPS.items():
        for i, case in enumerate(op.cases):
            out.append((f"op:{name}/{case.get('id', i)}", name, case))
    return out


def op_case_ir(op: str, case: dict, for_training: bool = False) -> IR:
    """A small IR that applies ``op`` to the case's input shapes.

    The first input is the model input; each further input is derived from it by a 1x1 conv
    (or a linear layer) to its channel count, then adaptive pooling to its spatial size.
    """
    shapes = [tuple(s) for s in case["inputs"]]
    layers, refs = [], ["input"]
    for i, shape in enumerate(shapes[1:], start=1):
        if len(shape) == 1:
            layers.append({"op": "linear", "name": f"in{i}", "inputs": ["input"], "out_features": shape[0]})
        else:
            layers.append({"op": "conv2d", "name": f"in{i}", "inputs": ["input"], "out_channels": shape[0], "kernel": 1})
            if shape[1:] != shapes[0][1:]:
                layers.append({"op": "adaptive_avgpool2d", "name": f"in{i}p", "output_size": list(shape[1:])})
        refs.append(layers[-1]["name"])
    node = {"op": op, "name": "op", **case["attrs"]}
    if len(shapes) > 1:
        node["inputs"] = refs
    layers.append(node)
    if for_training:  # logits for the cross-entropy: the op's output, flattened
        layers.append({"op": "flatten", "name": "logits"})
    doc = {"name": f"{op}_case", "input": list(shapes[0]), "layers": layers}
    return build_ir(doc, f"op table case {op}")


def op_case(op: str, case: dict, seed: int = 0, batch: int = 2) -> Case:
    ir = op_case_ir(op, case)
    weights = probe.probe_weights(ir, seed)
    x = init._normal(stream(seed, "op.input"), (batch, *ir.input_shape)) * case.get("scale", 1.0) + case.get("shift", 0.0)
    x = x.astype(np.float32)
    expected = reference.run(ir, weights, x).outputs
    return Case(f"op:{op}/{case.get('id', '')}", ir, weights, x, expected)


def model_case(model: str, seed: int = 0, batch: int = 2) -> Case:
    """The model at its test input with probe weights and its reference outputs (eval)."""
    ir = zoo.load_for_test(model)
    path = cache_dir() / "conformance" / f"{file_safe(model)}-{ir.fingerprint()}-s{seed}-b{batch}-{code_version()}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            weights = {k[2:]: f[k] for k in f.files if k.startswith("w:")}
            x = f["x"]
            expected = [f[f"out{i}"] for i in range(len([k for k in f.files if k.startswith("out")]))]
        return Case(f"model:{model}", ir, weights, x, expected)
    weights = probe.probe_weights(ir, seed, output_std=MODEL_OUTPUT_STD)
    x = init._normal(stream(seed, "model.input"), (batch, *ir.input_shape)).astype(np.float32)
    expected = reference.run(ir, weights, x).outputs
    if ir.trainable_params + ir.non_trainable_params <= CACHE_LIMIT_PARAMS:
        arrays = {f"w:{k}": v for k, v in weights.items()}
        arrays.update(x=x, **{f"out{i}": o for i, o in enumerate(expected)})
        save_arrays(path, arrays)
    return Case(f"model:{model}", ir, weights, x, expected)


# --------------------------------------------------------------------------- training parity

PARITY_OPTIMIZER = Optimizer(lr=0.1, momentum=0.9, weight_decay=0.01)
"""Momentum and weight decay of parity steps; the learning rate is set per case (below)."""
TRAIN_STEPS = 2  # the second step exercises the momentum buffers
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
WEIGHT_ATOL = 1e-6
UPDATE_RTOL = 1e-3
"""Per tensor, the backend's update (new - old) must equal the oracle's within this fraction of
the oracle's largest update. Weights after a sane step differ from the start by little, so
weight tolerances alone would pass a wrong gradient in a layer whose update is small; the
update check is scale-free: fp32 noise (1e-5..1e-4) passes, a wrong backward fails."""


QUICK_TRAINING_MODELS = (
    "lenet5", "alexnet", "nin", "squeezenet1_1", "resnet18", "resnet50_sd", "mobilenet_v2",
    "mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0",
)
"""Specs whose training parity runs in every backend's test env (CI). Together they train
every op the zoo uses inside a network, but those of QUICK_TRAINING_EXCEPTIONS, and every
combinator (add, concat, mul, split, drop_path), at the cost of minutes (a core test checks
the coverage). The whole zoo runs with ``--training-models all`` or ``samenet parity``. Not
here: GoogLeNet and the Inception family, whose branch-4 max pool of a max-pooled map holds
dozens of windows whose two largest values are closer than fp32 error at that depth, more than
the oracle can resolve both ways (see docs/identity.md)."""

QUICK_TRAINING_EXCEPTIONS = {
    "lrn": "only AlexNet (paper) and ZFNet use it, 61-62M parameters at 224x224 (no reduced input): two "
           "steps per backend cost minutes and their oracle is too large to cache; trained by the op tier "
           "(train:op:lrn/*) and by samenet parity",
    "scale": "only Inception-ResNet-v2 uses it, excluded for its max-pool near-ties (above); trained by the op "
             "tier (train:op:scale/*) and by samenet parity",
}
"""Ops of the zoo that the quick training set does not train inside a network, with the reason."""


CI_FORWARD_SKIPPED = {
    "vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11",
    "vgg11_bn": "vgg16_bn", "vgg13_bn": "vgg16_bn", "vgg19_bn": "vgg16_bn",
    "resnet101": "resnet50", "resnet152": "resnet50",
}
"""Specs the ``ci`` forward selection leaves out -> the kept spec they vary (only the stage
depths, ``args``; same builders and ops). The VGGs hold a 100M-parameter classifier whose
framework-side initialisation dominates the forward tier; with the two deep ResNets they
cost about 14 of CI's minutes over the backends (measured per env: 110-245 s and 20-25 s). ``--forward-models all`` (the default) and ``samenet parity`` run them."""


def forward_models(selection: str) -> list[str]:
    """The specs named by a ``--forward-models`` value: all, ci, or a comma list."""
    if selection == "all":
        return zoo.names()
    if selection == "ci":
        return [m for m in zoo.names() if m not in CI_FORWARD_SKIPPED]
    return _spec_list("--forward-models", selection, "all, ci")


def training_models(selection: str) -> list[str]:
    """The specs named by a ``--training-models`` value: quick, all, or a comma list."""
    if selection == "quick":
        return [m for m in QUICK_TRAINING_MODELS if m in zoo.names()]
    if selection == "all":
        return zoo.names()
    return _spec_list("--training-models", selection, "quick, all")


def _spec_list(option: str, selection: str, keywords: str) -> list[str]:
    """The specs of a comma list, refusing an unknown one (UsageError naming the option)."""
    chosen = [m.strip() for m in selection.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in zoo.names()]
    if unknown:
        raise UsageError(f"{option}: unknown spec(s) {', '.join(unknown)} ({keywords}, or names from `samenet list`)")
    return chosen


@dataclass
class TrainingCase:
    """Oracle training steps: start weights, batch, masks, then loss and weights per step."""

    id: str
    ir: IR
    weights: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    masks: dict[str, np.ndarray]
    losses: list[float]
    steps: list[dict[str, np.ndarray]]
    optimizer: Optimizer = PARITY_OPTIMIZER
    tie_windows: list = field(default_factory=list)  # per step, the near-tied windows (node, n, c, i, j)
    bn_unbiased: bool = True
    _alternatives: list = field(default_factory=list, repr=False)
    fitted: list = field(default_factory=list, repr=False)  # the last fitted_flips, per step

    @property
    def near_ties(self) -> int:
        """Max-pool near-ties left in the batch over all steps (see _tie_free_case)."""
        return sum(len(windows) for windows in self.tie_windows)

    def flip_sets(self) -> list[list[list[tuple]]]:
        """Per alternative, per step, the near-tie windows it resolves the other way.

        Every non-empty combination of the near-ties, when there are at most MAX_FLIPPED.
        """
        import itertools

        flat = [(k, w) for k, windows in enumerate(self.tie_windows) for w in windows]
        if not flat or len(flat) > MAX_FLIPPED:
            return []
        return [[[w for (k, w), c in zip(flat, chosen) if c and k == step] for step in range(TRAIN_STEPS)]
                for chosen in itertools.product([False, True], repeat=len(flat)) if any(chosen)]

    def trajectories(self, observed=None):
        """The oracle's trajectory, then each alternative resolution of near-ties.

        Alternatives are exact float64 oracles too, computed when first asked for (and kept):
        a backend that matches the oracle's own trajectory never pays for them, and the disk
        cache holds the tie windows rather than up to 15 extra copies of the weights.

        Args:
            observed: ``(start weights, weights after each step)`` of a float32 run. Last comes
                the exact trajectory through the near-ties as that run resolved them
                (fitted_flips, kept in ``self.fitted``), where it differs from those before.
        """
        yield self.losses, self.steps
        flip_sets = self.flip_sets()
        for j, flips in enumerate(flip_sets):
            if j == len(self._alternatives):
                alt = _oracle(self.id, self.ir, self.weights, self.x, self.y, 0, self.bn_unbiased, flips,
                              self.optimizer, self.masks)
                self._alternatives.append((alt.losses, alt.steps))
            yield self._alternatives[j]
        if observed is not None:
            self.fitted = fitted_flips(self, *observed)
            known = [[sorted(step) for step in flips] for flips in [[[]] * TRAIN_STEPS, *flip_sets]]
            if [sorted(step) for step in self.fitted] not in known:
                alt = _oracle(self.id, self.ir, self.weights, self.x, self.y, 0, self.bn_unbiased, self.fitted,
                              self.optimizer, self.masks)
                yield alt.losses, alt.steps


def parity_lr(ir, params, gradients, loss, x, y, masks, bn_unbiased) -> float:
    """A learning rate whose step lowers the loss by at most 10% (a line search on the oracle).

    It starts where the median parameter would move by 10% of its RMS and divides by 4 until
    the step is gentle: larger steps saturate the logits (a batch of 4, 1000 classes), after
    which the loss and its fp32 rounding mean nothing. Sensitivity does not need large steps:
    the update check (UPDATE_RTOL) is relative to each tensor's own update.
    """
    from dataclasses import replace

    ratios = []
    for name, p in ir.params.items():
        g = gradients.get(name)
        if p.trainable and g is not None and np.any(g):
            ratios.append(float(np.sqrt(np.mean(np.square(params[name]))) / np.sqrt(np.mean(np.square(g)))))
    lr = float(np.clip(0.1 * np.median(ratios), 1e-6, 10.0)) if ratios else PARITY_OPTIMIZER.lr
    for _ in range(16):
        trial, _ = grads.sgd_update(ir, params, gradients, {}, replace(PARITY_OPTIMIZER, lr=lr))
        after = grads.loss_at(ir, trial, x, y, masks, bn_unbiased)
        if 0.9 * loss <= after <= loss:
            break
        lr /= 4
    return lr


def _oracle(case_id, ir, weights, x, y, seed, bn_unbiased, flips=(), opt=None, masks=None) -> TrainingCase:
    """TRAIN_STEPS oracle steps; ``flips[k]`` are the near-tie windows resolved the other way at step k."""
    from dataclasses import replace

    params = {k: v.astype(np.float64) for k, v in weights.items()}
    momentum, losses, steps = None, [], []
    for k in range(TRAIN_STEPS):
        step_flips = flips[k] if k < len(flips) else ()
        loss, g, updates, used = grads.gradients(ir, params, x, y, masks, seed, bn_unbiased=bn_unbiased,
                                                 flips=step_flips)
        if opt is None:
            opt = replace(PARITY_OPTIMIZER, lr=parity_lr(ir, params, g, loss, x, y, used, bn_unbiased))
        masks = masks or used
        params, momentum = grads.sgd_update(ir, params, g, updates, opt, momentum)
        losses.append(loss)
        steps.append({n: v.astype(np.float32) for n, v in params.items()})
    return TrainingCase(case_id, ir, weights, x, y, masks or {}, losses, steps, opt, bn_unbiased=bn_unbiased)


def op_training_case(op: str, case: dict, seed: int = 0, batch: int = 4, bn_unbiased: bool = True) -> TrainingCase:
    ir = op_case_ir(op, case, for_training=True)
    weights = probe.probe_weights(ir, seed)
    x = init._normal(stream(seed, "op.train.input"), (batch, *ir.input_shape)) * case.get("scale", 1.0) + \
        case.get("shift", 0.0)
    y = np.random.default_rng(seed).integers(0, int(np.prod(ir.output_shape)), batch)
    return _oracle(f"train:op:{op}/{case.get('id', '')}", ir, weights, x.astype(np.float32), y, seed, bn_unbiased)


def run_training_case(backend, case: TrainingCase):
    """The backend's side of a training case: ``(start weights, losses, weights after each step)``."""
    from .backend import BuildConfig

    backend.build(case.ir, BuildConfig(optimizer=case.optimizer))
    backend.set_weights(case.weights)
    if case.masks:
        backend.set_masks(case.masks)
    batch = backend.to_device(case.x, case.y)
    start = backend.get_weights()
    losses, weights = [], []
    for _ in case.steps:
        losses.append(backend.loss_value(backend.train_step(batch)))
        weights.append(backend.get_weights())
    return start, losses, weights

TIE_RTOL = 3e-6
"""Max-pool windows whose two largest values are closer than this (relative to the pooled
tensor's RMS) are near-ties: fp32 rounding may pick either, and the gradient goes elsewhere."""


def maxpool_near_ties(ir, params, x, masks=None, rtol: float = TIE_RTOL) -> list[tuple]:
    """Near-tied max-pool windows ``(node, n, c, i, j)`` of a train-mode forward, closest first.

    Near: the two largest values closer than ``rtol`` times the pooled tensor's RMS. Exact
    ties are benign (copies of one value, or zeros whose ReLU passes no gradient).
    """
    from .ops import RefContext, _pool_pad, _windows, ops_with

    pools = ops_with("argmax")
    if not any(n.op in pools for n in ir.nodes):
        return []
    ctx = RefContext(train=True, masks=dict(masks or {}), rng=np.random.default_rng(0))
    acts = {n.name: o for n, o in reference.iterate(ir, params, x, ctx, keep=True)}
    found = []
    for n in ir.nodes:
        if n.op not in pools:
            continue
        a = acts[n.inputs[0]]
        windows = _windows(_pool_pad(a, n.attrs, n.shape[1:], -np.inf), n.attrs["kernel"], n.attrs["stride"], (1, 1),
                           n.shape[1:])
        top2 = np.sort(windows.reshape(*windows.shape[:4], -1), axis=-1)[..., -2:]
        gap = top2[..., 1] - top2[..., 0]
        scale = float(np.sqrt(np.mean(np.square(a)))) or 1.0
        near = np.isfinite(gap) & (gap > 0) & (gap < rtol * scale)
        found += [(float(gap[tuple(idx)] / scale), (n.name, *map(int, idx))) for idx in np.argwhere(near)]
    return [window for _, window in sorted(found, key=lambda f: f[0])]


MAX_FLIPPED = 4  # near-ties resolved both ways at most (2**4 trajectories)

TIE_FIT_RTOL = 1e-4
"""Candidates of fitted_flips: windows whose two largest values are closer than this (relative
to the pooled tensor's RMS). Float32 activations deep in a network carry errors of about 1e-5
of their RMS, so a float32 run can resolve such a window either way; either is a correct
gradient of max at a point float32 cannot tell from a tie, and the forward pass differs by
the gap at most."""
MAX_FIT_CANDIDATES = 128  # the closest windows, when there are more (one backward pass each)
SKETCH_SIZE = 1 << 16  # buckets of the CountSketch that fitted_flips compares updates through


def fitted_flips(case: "TrainingCase", start_got, got_steps) -> list[list[tuple]]:
    """Per step, the near-tie windows a float32 run resolved the other way, read off its updates.

    A flipped window changes no forward value, only where its gradient goes, so each flip
    moves the step's update by its own delta (to first order: flips in series interact at
    second order, and the trajectory is recomputed exactly afterwards). At each step, on the
    trajectory fitted so far, the run's update minus the oracle's, per tensor in units of its
    update tolerance, is fitted as a 0/1 combination of the candidates' deltas: least squares,
    rounded, then single toggles while one lowers the residual. Vectors are compared through a
    CountSketch of SKETCH_SIZE buckets (random bucket and sign per weight: inner products kept,
    memory flat in the network's size).

    The run chooses only among exact float64 trajectories that resolve near-ties
    (TIE_FIT_RTOL) differently; it cannot bend the oracle any other way.
    """
    ir, trainable = case.ir, [n for n, p in case.ir.params.items() if p.trainable]
    rng = np.random.default_rng(0)
    buckets = {n: (rng.integers(0, SKETCH_SIZE, ir.params[n].size), rng.choice([-1.0, 1.0], ir.params[n].size))
               for n in trainable}
    params = {k: v.astype(np.float64) for k, v in case.weights.items()}
    before_got, momentum, chosen = start_got, None, []
    for got in got_steps:
        windows = maxpool_near_ties(ir, params, case.x, case.masks, TIE_FIT_RTOL)[:MAX_FIT_CANDIDATES]
        _, g0, updates, _ = grads.gradients(ir, params, case.x, case.y, case.masks, 0, bn_unbiased=case.bn_unbiased)
        g, step_flips = g0, []
        if windows:
            base, _ = grads.sgd_update(ir, params, g0, updates, case.optimizer, momentum)
            scale = {n: WEIGHT_ATOL + UPDATE_RTOL * np.abs(base[n] - params[n]).max() for n in trainable}

            def sketch(delta):
                return sum(np.bincount(buckets[n][0], weights=buckets[n][1] * (np.ravel(delta[n]) / scale[n]),
                                       minlength=SKETCH_SIZE) for n in trainable)

            residual = sketch({n: (np.asarray(got[n], np.float64) - np.asarray(before_got[n], np.float64))
                                  - (base[n] - params[n]) for n in trainable})
            deltas = []
            for window in windows:
                _, g_flip, _, _ = grads.gradients(ir, params, case.x, case.y, case.masks, 0,
                                                  bn_unbiased=case.bn_unbiased, flips=[window])
                deltas.append(sketch({n: -case.optimizer.lr * (g_flip[n] - g0[n]) for n in trainable}))
            d = np.stack(deltas, axis=1)
            on = np.linalg.lstsq(d, residual, rcond=None)[0] > 0.5
            error, norms = residual - d @ on, np.square(d).sum(axis=0)
            for _ in range(2 * len(windows)):  # single toggles, the best first, while one helps
                along = d.T @ error
                gain = np.where(on, -2 * along - norms, 2 * along - norms)  # drop in |error|^2
                i = int(np.argmax(gain))
                if gain[i] <= 0:
                    break
                on[i] = not on[i]
                error = error + d[:, i] if not on[i] else error - d[:, i]
            step_flips = [w for w, flip in zip(windows, on) if flip]
            if step_flips:  # the step's gradient through its flips (BN updates do not depend on them)
                _, g, _, _ = grads.gradients(ir, params, case.x, case.y, case.masks, 0, bn_unbiased=case.bn_unbiased,
                                             flips=step_flips)
        chosen.append(step_flips)
        params, momentum = grads.sgd_update(ir, params, g, updates, case.optimizer, momentum)
        before_got = got
    return chosen


def _tie_free_case(case_id, ir, weights, seed, bn_unbiased, batches=(4,), tries=8) -> TrainingCase:
    """Oracle steps on a seeded batch, with max-pool near-ties resolved both ways.

    Near-ties are common in networks that pool pooled maps (GoogLeNet's branch 4): there a
    step's gradient depends on how fp32 rounding orders two nearly equal values. The batch is
    the first seeded one with no near-tie at any step; failing that, the one with the fewest,
    whose near-ties are then resolved both ways: every combination is an alternative
    trajectory, each an exact float64 computation, and a backend must match one. (Smaller
    batches have fewer windows but leave BN statistics of late 2x2 maps to 8 values, whose
    fp32 noise over two steps exceeds the tolerances: 4 images it is.)
    """
    classes = int(np.prod(ir.output_shape))
    best = None
    for batch in batches:
        for k in range(tries):
            s = seed + k
            x = init._normal(stream(s, "model.train.input"), (batch, *ir.input_shape)).astype(np.float32)
            y = np.random.default_rng([s, batch]).integers(0, classes, batch)
            first = maxpool_near_ties(ir, {n: v.astype(np.float64) for n, v in weights.items()}, x)
            if best is not None and len(first) >= best.near_ties:
                continue
            case = _oracle(case_id, ir, weights, x, y, s, bn_unbiased)
            ties = [first] + [maxpool_near_ties(ir, {n: v.astype(np.float64) for n, v in step.items()}, x, case.masks)
                              for step in case.steps[:-1]]
            case.tie_windows = ties
            if case.near_ties == 0:
                return case
            if best is None or case.near_ties < best.near_ties:
                best = case
    return best


def model_training_case(model: str, seed: int = 0, bn_unbiased: bool = True) -> TrainingCase:
    """Two oracle steps of a spec at its test input from its probe weights (cached on disk)."""
    ir = zoo.load_for_test(model)
    tag = "u" if bn_unbiased else "b"
    path = cache_dir() / "training" / f"{file_safe(model)}-{ir.fingerprint()}-s{seed}-{tag}-{code_version()}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            get = lambda prefix: {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}  # noqa: E731
            steps = [get(f"s{k}:") for k in range(TRAIN_STEPS)]
            tie_windows = [[] for _ in range(TRAIN_STEPS)]
            for k, node, idx in zip(f["tie_step"], f["tie_node"], f["tie_index"]):
                tie_windows[int(k)].append((str(node), *map(int, idx)))
            return TrainingCase(f"train:{model}", ir, get("w:"), f["x"], f["y"], get("m:"),
                                [float(v) for v in f["losses"]], steps,
                                Optimizer(*(float(v) for v in f["optimizer"])), tie_windows, bn_unbiased)
    weights = probe.probe_weights(ir, seed, output_std=MODEL_OUTPUT_STD)
    case = _tie_free_case(f"train:{model}", ir, weights, seed, bn_unbiased)
    if ir.trainable_params + ir.non_trainable_params <= CACHE_LIMIT_PARAMS:
        arrays = {f"w:{k}": v for k, v in weights.items()}
        arrays.update({f"m:{k}": np.asarray(v) for k, v in case.masks.items()})
        for k, step in enumerate(case.steps):
            arrays.update({f"s{k}:{n}": v for n, v in step.items()})
        ties = [(k, w) for k, windows in enumerate(case.tie_windows) for w in windows]
        arrays.update(tie_step=np.array([k for k, _ in ties], dtype=np.int64),
                      tie_node=np.array([w[0] for _, w in ties], dtype=str),
                      tie_index=np.array([w[1:] for _, w in ties], dtype=np.int64).reshape(-1, 4))
        arrays.update(x=case.x, y=case.y, losses=np.array(case.losses, dtype=np.float64),
                      optimizer=np.array([case.optimizer.lr, case.optimizer.momentum, case.optimizer.weight_decay]))
        save_arrays(path, arrays)
    return case


def step_errors(before_got, got, before_want, want) -> dict[str, tuple[float, float, float]]:
    """Per parameter: (max abs weight error, weight error / tolerance, update error / tolerance).

    Weight tolerance: WEIGHT_ATOL + WEIGHT_RTOL * |w|, elementwise. Update tolerance:
    UPDATE_RTOL * max |oracle update| (plus WEIGHT_ATOL), per tensor.
    """
    out = {}
    for name, w in want.items():
        g = np.asarray(got[name], dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        err = np.abs(g - w)
        if not err.size:
            continue
        weight_ratio = float((err / (WEIGHT_ATOL + WEIGHT_RTOL * np.abs(w))).max())
        du_want = w - np.asarray(before_want[name], dtype=np.float64)
        du_got = g - np.asarray(before_got[name], dtype=np.float64)
        update_ratio = float(np.abs(du_got - du_want).max() / (WEIGHT_ATOL + UPDATE_RTOL * np.abs(du_want).max()))
        out[name] = (float(err.max()), weight_ratio, update_ratio)
    return out


FP32_FACTOR = 2.0
"""A backend whose step misses the tolerances is ``fp32-bound`` (an accepted exception, not a
pass) when its worst error is within FP32_FACTOR times that of numpy's own float32 runs of the
same steps: the tolerance is then below what float32 gives for this network. Measured
(parity, 2 steps): numpy float32 against the float64 oracle is off by 5.2x the tolerance in
densenet121 (120 BNs), 4.7x in inception_v3 and up to 33x in googlenet_aux, where a float32
max-pool near-tie sends a gradient to the other element; the backends land near numpy's
figure. A wrong backward is off by orders of magnitude, and not only where float32 is."""


FP32_ORDERS = ((1, 0), (-1, 0), (1, 1), (-1, 1))  # batch orders (direction, rotation) of fp32_floor


def fp32_floor(case: TrainingCase) -> tuple[float, str | None]:
    """(worst error/tolerance ratio, its parameter) of numpy's float32 steps against the oracle.

    The same batch, masks and learning rate computed in float32 by the numpy reference, once
    per FP32_ORDERS permutation of the batch (the loss is a mean, so only the rounding of the
    batch sums changes): samples of the error a careful float32 implementation shows. Each is
    judged against the closest of the oracle's enumerated trajectories; the worst counts. (Not
    against a trajectory fitted to its own tie resolutions, as a backend is at the end: four
    fits cost minutes on GoogLeNet, so the floor stays the more lenient one.)
    """
    runs = _fp32_runs(case)
    return runs["weights"], runs["weights_param"]


def fp32_loss_floor(case: TrainingCase) -> float:
    """Worst relative loss error of numpy's float32 runs (fp32_floor) after the first step.

    The first step's loss comes from the given weights: it must match whatever this says.
    Later losses come from weights that already carry float32 error; on a net whose train-mode
    BatchNorm normalises a few nearly equal values (Inception-v4 at its test input) that error
    reaches the loss."""
    return _fp32_runs(case)["later_loss"]


def _fp32_runs(case: TrainingCase) -> dict:
    """fp32_floor's measurements, cached per case (every backend that misses needs them)."""
    import hashlib

    digest = hashlib.sha256(case.x.tobytes()).hexdigest()[:12]
    path = (cache_dir() / "floor" /
            f"{case.id.split(':')[-1]}-{case.ir.fingerprint()}-{digest}-{'u' if case.bn_unbiased else 'b'}-{code_version()}.json")
    cached = _read_floor_cache(path)
    if cached is not None:
        return cached
    floors, later_loss = [], 0.0
    n = len(case.x)
    for order in (np.roll(np.arange(n)[::step], shift) for step, shift in FP32_ORDERS):
        masks = {k: np.asarray(m)[order] for k, m in case.masks.items()}  # per-sample masks, batch first
        params = {k: v.astype(np.float32) for k, v in case.weights.items()}
        momentum, steps, losses = None, [], []
        for _ in case.steps:
            loss, g, updates, _ = grads.gradients(case.ir, params, case.x[order], case.y[order], masks, 0,
                                                  dtype=np.float32, bn_unbiased=case.bn_unbiased)
            params, momentum = grads.sgd_update(case.ir, params, g, updates, case.optimizer, momentum,
                                                dtype=np.float32)
            steps.append({n: v.astype(np.float32) for n, v in params.items()})
            losses.append(float(loss))
        trajectories = list(case.trajectories())
        floors.append(min(worst_step_error(case.weights, steps, case.weights, want) for _, want in trajectories))
        later_loss = max(later_loss, min(max((abs(got - want) / abs(want) for got, want in zip(losses[1:], wants[1:])),
                                             default=0.0) for wants, _ in trajectories))
    floor, where = max(floors)
    runs = {"weights": float(floor), "weights_param": where, "later_loss": float(later_loss)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(runs))
    tmp.replace(path)
    return runs


def _read_floor_cache(path) -> dict | None:
    """A cached _fp32_runs result, or None when the file is missing, unreadable or malformed.

    A cache written by an interrupted run or another version must cost a recomputation,
    never a failed conformance case."""
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(runs, dict) and isinstance(runs.get("weights"), (int, float))
          and isinstance(runs.get("later_loss"), (int, float))
          and (runs.get("weights_param") is None or isinstance(runs.get("weights_param"), str)))
    return runs if ok else None


def fp32_bound_reason(ratio: float, where, floor: float, floor_where) -> str | None:
    """The ``fp32-bound`` reason when a weight error ``ratio`` is within FP32_FACTOR of ``floor``, else None."""
    if ratio <= FP32_FACTOR * floor:
        return (f"weights off by {ratio:.1f}x the tolerance at {where}; numpy's own float32 steps are off by "
                f"{floor:.1f}x (at {floor_where})")
    return None


def worst_step_error(start_got, got_steps, start_want, want_steps) -> tuple[float, str | None]:
    """(worst of weight and update error/tolerance over steps and parameters, its parameter)."""
    worst, where = 0.0, None
    before_got, before_want = start_got, start_want
    for got, want in zip(got_steps, want_steps):
        for name, (_, weight_ratio, update_ratio) in step_errors(before_got, got, before_want, want).items():
            ratio = max(weight_ratio, update_ratio)
            if not np.isfinite(ratio) or ratio > worst:
                worst, where = ratio, name
        before_got, before_want = got, want
    return worst, where


def step_mismatches(before_got, got, before_want, want):
    """(name, max abs error, weight err/tol, update err/tol) of parameters out of tolerance, worst first."""
    bad = [(n, e, w, u) for n, (e, w, u) in step_errors(before_got, got, before_want, want).items()
           if not (w <= 1.0 and u <= 1.0)]
    return sorted(bad, key=lambda b: -max(b[2], b[3]) if np.isfinite(max(b[2], b[3])) else -np.inf)
