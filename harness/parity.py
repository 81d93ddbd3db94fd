"""Proof of identity as a command: forward and training-step parity per backend and model.

For each backend, a child process in that backend's env (``python -m samenet.parity CONFIG
OUT_DIR``) runs, per model at its test input:

* forward: eval-mode logits from the probe weights against the float64 numpy reference:
  max absolute error, relative error (max absolute error over max |reference|), and the
  worst ratio of error to the tolerance (rtol 1e-4, atol 1e-5);
* training: two steps of the written update rule against the numpy oracle (samenet.grads):
  loss difference (relative, tolerance 1e-5), and after each step the max absolute weight
  error and the worst error-to-tolerance ratio over every parameter (rtol 1e-4, atol 1e-6),
  BN running statistics included. The oracle's trajectories are its own, each resolution of
  its few near-ties, and last, for a row that would otherwise be a ``mismatch``, the one
  through the near-ties as the backend resolved them (samenet.conformance.fitted_flips); a
  pass through that one says how many it took.

The oracle is numpy's own backward pass (samenet.grads), checked against finite differences
for every op case; it depends on no framework, so no backend judges another.

Where the weights miss the tolerance, numpy's own float32 runs of the same steps are measured
too: when the backend is within FP32_FACTOR of their error, the row is ``fp32-bound`` (the
tolerance is below what float32 gives for this network, see samenet.conformance.FP32_FACTOR),
an accepted exception with both figures in the reason. A row still a ``mismatch`` then, on a
backend that ``verifies_fp64``, runs the same steps built in float64: when those match the
oracle, the network, backward and update are proven the oracle's and the float32 miss is the
framework's rounding (say a filter gradient summed in one running float32 total), so the row is
``fp32-bound`` with that proof in its reason.

Each (backend, model) is one row: ``pass``, ``fp32-bound``, ``mismatch`` (with the worst offender),
``unsupported`` (with the reason), ``error`` or ``crash``; a row matching the backend's
``known_gaps`` carries that reason too. Rows go to the results store (kind ``parity``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROW_VERSION = 1
ACCEPTED = ("pass", "fp32-bound")  # statuses the parity command does not count as failing


def _forward(b, model: str) -> dict:
    from .backend import BuildConfig
    from .conformance import ATOL, RTOL, model_case

    c = model_case(model)
    b.build(c.ir, BuildConfig())
    counts = b.param_counts()
    b.set_weights(c.weights)
    got, want = b.forward(c.x)[0].astype(np.float64), c.expected[0]
    err = np.abs(got - want)
    return {"params_ok": counts == (c.ir.trainable_params, c.ir.non_trainable_params),
            "params_backend": list(counts), "fwd_max_abs": float(err.max()),
            "fwd_rel": float(err.max() / np.abs(want).max()),
            "fwd_worst_ratio": float((err / (ATOL + RTOL * np.abs(want))).max())}


def _train(b, model: str, info) -> dict:
    """Training-step figures against the closest oracle trajectory.

    Order of cost: the oracle's enumerated trajectories first; if none matches, numpy's
    float32 floor (cached per case, so each backend after the first gets it free); only a row
    that would then be a ``mismatch`` pays for the fitted trajectory (one float64 backward pass
    per candidate window and step: 20+ minutes on Inception-v3), which may turn it into a pass.
    A row already within FP32_FACTOR of the floor stays ``fp32-bound`` unfitted.
    """
    from .conformance import fp32_floor, fp32_loss_floor, model_training_case, run_training_case

    c = model_training_case(model, bn_unbiased=info.bn_variance == "unbiased")
    start, losses, weights = run_training_case(b, c)
    enumerated = 1 + len(c.flip_sets())
    best = None
    for j, (want_losses, want_steps) in enumerate(c.trajectories()):
        out = _trajectory_errors(c, start, losses, weights, want_losses, want_steps, j)
        if best is None or out["train_worst_ratio"] < best["train_worst_ratio"]:
            best = out
        if best["train_worst_ratio"] <= 1:  # matched: later alternatives are not computed
            return best
    ratio, param = fp32_floor(c)
    floor = {"fp32_floor_ratio": ratio, "fp32_floor_param": param, "fp32_loss_floor": fp32_loss_floor(c)}
    best.update(floor)
    if verdict(best)[0] == "fp32-bound":
        return best
    for j, (want_losses, want_steps) in enumerate(c.trajectories((start, weights))):
        if j == enumerated:  # the trajectory through this backend's own tie resolutions
            out = _trajectory_errors(c, start, losses, weights, want_losses, want_steps, j)
            out["fitted_flips"] = [len(step) for step in c.fitted]
            if out["train_worst_ratio"] < best["train_worst_ratio"]:
                best = {**out, **floor}
    if best["train_worst_ratio"] <= 1:
        for key in floor:
            best.pop(key)
    elif verdict(best)[0] == "mismatch":
        best.update(fp64_check(b, c) or {})
    return best


class _Float64:
    """A backend whose builds are float64 (VERIFY_PRECISION); everything else passes through."""

    def __init__(self, backend):
        self._backend = backend

    def build(self, ir, config) -> None:
        from dataclasses import replace

        from .backend import VERIFY_PRECISION

        self._backend.build(ir, replace(config, precision=VERIFY_PRECISION))

    def __getattr__(self, name):
        return getattr(self._backend, name)


def fp64_check(backend, case) -> dict | None:
    """The same steps built in float64 against the oracle, for a backend that ``verifies_fp64``.

    A float32 run can miss where numpy's careful float32 does not: a kernel that sums thousands
    of terms in one running float32 total rounds more (measured: TF's MobileNet-v1 conv1 filter
    gradient, 2.9x the tolerance with oneDNN, 6.2x with Eigen's kernels, against 0.1x for
    numpy). When the same build in float64 matches the float64 oracle, the miss is float32.

    Returns:
        ``fp64_worst_ratio`` (weights and updates, per tolerance, against the closest
        enumerated trajectory) and ``fp64_loss_rel_diff``; None without a float64 build.
    """
    from .conformance import run_training_case, worst_step_error

    if not backend.info.capabilities.fp64:
        return None
    start, losses, weights = run_training_case(_Float64(backend), case)
    best = None
    for want_losses, want_steps in case.trajectories():
        ratio, _ = worst_step_error(start, weights, case.weights, want_steps)
        loss = max(abs(got - want) / abs(want) for got, want in zip(losses, want_losses))
        if best is None or ratio < best["fp64_worst_ratio"]:
            best = {"fp64_worst_ratio": float(ratio), "fp64_loss_rel_diff": float(loss)}
    return best


def fp64_bound_reason(row: dict) -> str | None:
    """The float64 proof's words when that run matched the oracle (fp64_check), else None."""
    from .conformance import LOSS_RTOL

    ratio, loss = row.get("fp64_worst_ratio"), row.get("fp64_loss_rel_diff")
    if ratio is None or loss is None or not (ratio <= 1 and loss <= LOSS_RTOL):
        return None
    return f"the same build in float64 matches the oracle ({ratio:.2f}x the tolerance, loss {loss:.0e} relative)"


def _trajectory_errors(c, start, losses, weights, want_losses, want_steps, j: int) -> dict:
    """Loss and weight errors of a backend's steps against one oracle trajectory."""
    from .conformance import step_errors

    out = {"loss_rel_diff": 0.0, "loss1_rel_diff": abs(losses[0] - want_losses[0]) / abs(want_losses[0]),
           "train_max_abs": 0.0, "train_worst_ratio": 0.0, "train_worst_param": None,
           "train_lr": c.optimizer.lr, "losses": want_losses, "near_ties": c.near_ties, "trajectory": j,
           "fitted_flips": None}
    before_got, before_want = start, c.weights
    for got_loss, loss, got, want in zip(losses, want_losses, weights, want_steps):
        out["loss_rel_diff"] = max(out["loss_rel_diff"], abs(got_loss - loss) / abs(loss))
        for name, (err, weight_ratio, update_ratio) in step_errors(before_got, got, before_want, want).items():
            ratio = max(weight_ratio, update_ratio)
            out["train_max_abs"] = max(out["train_max_abs"], err)
            if not np.isfinite(ratio) or ratio > out["train_worst_ratio"]:
                out["train_worst_ratio"], out["train_worst_param"] = ratio, name
        before_got, before_want = got, want
    return out


def verdict(row: dict) -> tuple[str, str]:
    """(status, reason) of a measured row: ``pass``, ``fp32-bound`` or ``mismatch``.

    ``fp32-bound``: everything passes but the weights after the steps, and those are within
    FP32_FACTOR of the error of numpy's own float32 runs (samenet.conformance.fp32_floor); or
    the parameters, logits and first loss pass and the same steps built in float64 match the
    oracle (fp64_check), whatever float32 missed after the first step.
    """
    from .conformance import FP32_FACTOR, LOSS_RTOL, fp32_bound_reason

    floor = row.get("fp32_floor_ratio")
    loss_diff = row.get("loss_rel_diff", 0)
    # A later step's loss comes from weights that carry float32 error: excused like them, when
    # numpy's own float32 steps miss it too (the first step's loss never is).
    loss_fp32 = (loss_diff > LOSS_RTOL and row.get("loss1_rel_diff", np.inf) <= LOSS_RTOL
                 and loss_diff <= FP32_FACTOR * row.get("fp32_loss_floor", 0))
    only_weights = (row.get("params_ok", True) and row.get("fwd_worst_ratio", 0) <= 1
                    and (loss_diff <= LOSS_RTOL or loss_fp32))
    if only_weights and floor is not None:
        reason = fp32_bound_reason(row.get("train_worst_ratio", 0), row.get("train_worst_param"), floor,
                                   row.get("fp32_floor_param"))
        if reason:
            if loss_fp32:
                reason += (f"; step-2 loss off by {loss_diff:.1e} relative, numpy's own float32 steps by "
                           f"{row['fp32_loss_floor']:.1e}")
            return "fp32-bound", reason
    problems = []
    if not row.get("params_ok", True):
        problems.append(f"parameter counts {row.get('params_backend')}")
    if row.get("fwd_worst_ratio", 0) > 1:
        problems.append(f"logits off by {row['fwd_worst_ratio']:.1f}x the tolerance")
    if row.get("loss_rel_diff", 0) > LOSS_RTOL:
        problems.append(f"loss off by {row['loss_rel_diff']:.1e} relative")
    if not row.get("train_worst_ratio", 0) <= 1:
        problems.append(f"weights off by {row['train_worst_ratio']:.1f}x the tolerance at {row.get('train_worst_param')}"
                        + (f" (numpy's own float32 steps: {floor:.1f}x)" if floor is not None else ""))
    fp64 = fp64_bound_reason(row)
    if problems and fp64 and row.get("params_ok", True) and row.get("fwd_worst_ratio", 0) <= 1 \
            and row.get("loss1_rel_diff", np.inf) <= LOSS_RTOL:
        return "fp32-bound", f"{'; '.join(problems)} in float32; {fp64}"
    if problems:
        return "mismatch", "; ".join(problems)
    flips = row.get("fitted_flips")
    if flips:
        return "pass", (f"through {sum(flips)} max-pool near-tie(s) resolved as this backend did "
                        f"(per step: {', '.join(map(str, flips))})")
    return "pass", ""


def child(config: dict, out_dir: Path) -> int:
    """Runs parity for each model in turn, one row file per model, in this backend's env."""
    from . import backend as registry
    from .cell import classify_error

    info = registry.get(config["backend"])
    probe = info.create()
    probe.configure(config["threads"], True)
    version = probe.version()
    lacking = info.capabilities.lacks("train") if config["train"] else None
    for model in config["models"]:
        row = {"backend": info.name, "model": model, "framework_version": version, "row_version": ROW_VERSION}
        start = time.perf_counter()
        try:
            if config["forward"]:
                row.update(_forward(info.create(), model))
            if config["train"] and not lacking:
                row.update(_train(info.create(), model, info))
            row["status"], row["reason"] = verdict(row)
            if lacking and row["status"] == "pass":
                row["train_skipped"] = lacking
                row["reason"] = f"forward only: {lacking}"
        except Exception as exc:  # noqa: BLE001  (each model is its own row)
            row["status"] = classify_error(exc)
            row["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            row["error_detail"] = traceback.format_exc()[-3000:]
        row["seconds"] = time.perf_counter() - start
        (out_dir / config["files"][model]).write_text(json.dumps(row, default=float))
    return 0


def run_backend(backend: str, models: list[str], python: str, forward: bool, train: bool, threads: int,
                timeout: float, on_row=None) -> list[dict]:
    """Runs the child for a backend, one row per model; ``timeout`` is seconds per model.

    A child that dies, or spends more than ``timeout`` on one model, leaves that model a
    ``crash`` row and is restarted on the models after it.
    """
    import subprocess
    import tempfile

    from .cell import Cell
    from .lifetime import die_with_parent
    from .runner import child_environment

    env = child_environment(Cell(backend=backend, model=models[0], mode="infer", batch=1, threads=threads))
    rows: dict[str, dict] = {}
    pending = list(models)
    # Row files named by position: a model given as a spec path ("specs/x.json") must neither
    # make a folder nor meet another file of that name.
    files = {m: f"row-{i}.json" for i, m in enumerate(models)}

    def collect(out: Path) -> bool:
        """Moves the models whose row file the child wrote from pending to rows."""
        found = False
        for model in list(pending):
            path = out / files[model]
            if path.exists():
                rows[model] = json.loads(path.read_text())
                pending.remove(model)
                found = True
                if on_row:
                    on_row(rows[model])
        return found

    with tempfile.TemporaryDirectory(prefix="samenet-parity-") as tmp:
        out = Path(tmp)
        while pending:
            config = {"backend": backend, "models": pending, "forward": forward, "train": train, "threads": threads,
                      "files": files}
            (out / "config.json").write_text(json.dumps(config))
            log = out / "child.log"
            with open(log, "w") as log_file:
                proc = subprocess.Popen([python, "-m", "samenet.parity", str(out / "config.json"), str(out)], env=env,
                                        cwd=tmp, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=die_with_parent())
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    if collect(out):  # a row per model: each model gets the whole timeout
                        deadline = time.monotonic() + timeout
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    failure = f"timeout after {timeout:.0f} s"
                else:
                    failure = f"exit code {proc.returncode}"
            collect(out)
            if pending:  # the child died or hung on pending[0]: record it and go on with the rest
                model = pending.pop(0)
                rows[model] = {"backend": backend, "model": model, "status": "crash",
                               "reason": f"the parity process died on this model ({failure})",
                               "log_tail": log.read_text(errors="replace")[-2000:]}
                if on_row:
                    on_row(rows[model])
    for row in rows.values():
        reason = _gap(backend, row["model"])
        if reason:
            row["known_gap"] = reason
    return [rows[m] for m in models if m in rows]


def run_data_parallel(backend: str, models: list[str], python: str, workers: int, threads: int, timeout: float,
                      on_row=None) -> list[dict]:
    """Data-parallel parity rows: ``workers`` ranks' two steps per model against the oracle of
    the same group under the backend's declared BN semantics (samenet.dp_parity)."""
    from . import backend as registry
    from .dp_parity import DP_PER_WORKER, case_errors, dp_case, run_case

    info = registry.get(backend)
    rows = []
    for model in models:
        row = {"kind": "parity", "row_version": ROW_VERSION, "backend": backend, "model": model, "workers": workers,
               "batch_per_worker": DP_PER_WORKER, "threads": threads}
        start = time.perf_counter()
        if not info.capabilities.data_parallel or info.data_parallel is None:
            row.update(status="unsupported", reason=f"backend {backend} declares no data-parallel training")
        else:
            row["dp_bn"] = info.data_parallel.bn
            try:
                case = dp_case(model, info.data_parallel.bn, workers, bn_unbiased=info.bn_variance == "unbiased")
                got, failure = run_case(backend, case, python, threads, timeout)
                if failure:
                    row.update(status="error" if failure["status"] != "timeout" else "crash",
                               reason=failure["error"], log_tail=failure.get("log_tail"))
                else:
                    errors = case_errors(case, got)
                    row.update(loss_rel_diff=errors["loss_rel_diff"], train_worst_ratio=errors["train_worst_ratio"],
                               status="mismatch" if errors["problems"] else "pass",
                               reason="; ".join(errors["problems"][:3]))
            except Exception as exc:  # noqa: BLE001  (one model's failure is its row)
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        gap = info.gap_reason(f"dp:{model}")
        if gap:
            row["known_gap"] = gap
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def prepare_cases(backends: list[str], models: list[str], forward: bool, train: bool, workers: int = 1,
                  on_case=None) -> list[dict]:
    """Computes and caches the oracle's cases that parity and the conformance suite read, running
    no backend: the cases of ``models`` under the conventions the backends declare (BN
    running-variance, data-parallel BN semantics). Each case is one line: what, seconds, status.

    Framework-free: a sweep on many machines (or CI, while it installs the framework envs) then
    computes each float64 oracle once instead of once per backend env that finds the cache cold.
    """
    from . import backend as registry
    from .conformance import model_case, model_training_case
    from .dp_parity import DP_CONTROL_MODEL, control_bn, dp_case

    infos = [registry.get(b) for b in backends]
    jobs: list[tuple[str, object]] = []
    for model in models:
        if workers > 1:
            declared = {(i.data_parallel.bn, i.bn_variance == "unbiased") for i in infos
                        if i.capabilities.data_parallel and i.data_parallel is not None}
            if model == DP_CONTROL_MODEL:  # the conformance tier's negative control reads these too
                declared |= {(control_bn(bn), unbiased) for bn, unbiased in declared}
            for bn, unbiased in sorted(declared):
                jobs.append((f"dp:{model}/{bn}/{'unbiased' if unbiased else 'biased'}",
                             lambda m=model, bn=bn, u=unbiased: dp_case(m, bn, workers, bn_unbiased=u)))
            continue
        if forward:
            jobs.append((f"model:{model}", lambda m=model: model_case(m)))
        if train:
            for unbiased in sorted({i.bn_variance == "unbiased" for i in infos if i.capabilities.train}):
                jobs.append((f"train:{model}/{'unbiased' if unbiased else 'biased'}",
                             lambda m=model, u=unbiased: model_training_case(m, bn_unbiased=u)))
    lines = []
    for what, make in jobs:
        start = time.perf_counter()
        try:
            make()
            line = {"case": what, "status": "ok"}
        except Exception as exc:  # noqa: BLE001  (one case's failure is its line; the backend's run recomputes it)
            line = {"case": what, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        line["wall_s"] = time.perf_counter() - start
        lines.append(line)
        if on_case:
            on_case(line)
    return lines


def _gap(backend: str, model: str) -> str | None:
    from . import backend as registry

    info = registry.get(backend)
    return info.gap_reason(f"model:{model}") or info.gap_reason(f"train:{model}")


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    return child(config, Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
