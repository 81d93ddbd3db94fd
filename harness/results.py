"""The results store: append-only rows, one JSON file each, written atomically.

Killing a sweep at any moment loses no finished cell: a row is written to a temporary file
and renamed into place. ``load()`` returns every row as a pandas DataFrame (pandas is
imported here only, never in the cell process).

Columns of ``load()`` (one row per cell and repeat):

* configuration: ``kind`` (bench, parity, train), ``run_id``, ``cell_key``, ``backend``,
  ``model``, ``mode`` (train, infer), ``batch``, ``input`` (``"3x224x224"``, a failed cell's
  too: as asked, or its spec's default), ``device``, ``precision``,
  ``exec_mode``, ``options``, ``threads``, ``cpu_settings``, ``warmup``, ``iters``,
  ``repeat``, ``seed``;
* outcome: ``status`` (ok, error, unsupported, oom, timeout, crash, interrupted: Ctrl-C, rerun by the
  next sweep), ``error``;
* timings (seconds): ``import_s``, ``build_s``, ``weights_s``, ``to_device_s``,
  ``first_step_s``, ``step_median_s``, ``step_p10_s``, ``step_p90_s``, ``step_iqr_s``,
  ``step_mean_s``, ``step_min_s``, ``step_max_s``, ``step_std_s``, ``samples_ns`` (list);
  ``samples_per_s``, ``gflops_per_s`` (2 FLOPs per MAC, train = 3x forward);
* memory (MB): ``rss_after_import_mb``, ``rss_after_build_mb``, ``peak_rss_mb``,
  ``rss_increase_mb`` (peak over post-import), ``peak_rss_steps_mb`` (peak during the
  steps), ``gpu_alloc_peak_mb``, ``gpu_reserved_peak_mb``, ``gpu_nvml_mb``;
* network: ``spec_hash``, ``macs_per_sample``, ``params_trainable``, ``params_non_trainable``;
* environment: ``framework_version``, ``settings`` (dict), ``thread_env`` (dict),
  ``hostname``, ``os``, ``python`` (the version of the cell's own interpreter; None when it
  died before saying), ``python_path`` (that interpreter), ``driver_python``, ``cpu_model``, ``cpu_isa`` (its bf16/int8/AMX extensions: env.CPU_ISA), ``cpu_logical``, ``cpu_physical``,
  ``cpu_affinity``, ``memory_gb``, ``gpu``, ``gpu_driver``, ``machine_class``,
  ``git_revision``, ``git_dirty``, ``timestamp`` (UTC ISO 8601), ``wall_s`` (the process);
* placement (samenet.executors): ``executor`` (local, ray, slurm), ``node`` (host name of the
  machine that ran the cell; None when its task, node or job was lost), ``node_id`` (Ray's
  node id), ``slurm_job_id``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def file_safe(text: str, limit: int = 120) -> str:
    """``text`` as part of a file name: only letters, digits and ``_.-`` (a model given as a spec
    path, "specs/lenet5.json", must not become a folder, nor an absolute path a place outside)."""
    return _SAFE.sub("_", text)[:limit]

STALE_TMP_S = 600.0
"""A temporary row file older than this was left by a writer that died (a live one renames
its file within milliseconds)."""
_warned: set[Path] = set()


def _warn(path: Path, why: str) -> None:
    """One line on stderr per damaged file and process."""
    if path not in _warned:
        _warned.add(path)
        print(f"warning: {path}: skipped, {why}", file=sys.stderr)


CLAIM_TTL_S = 6 * 3600.0
"""A claim of another host is taken over after this long (its liveness cannot be checked)."""


def _stale(claim: dict) -> bool:
    """The claim's process is gone (this host), or it is an unreadable or old claim of another."""
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - float(claim.get("time") or 0) > CLAIM_TTL_S


def row_problem(row) -> str | None:
    """Why ``row`` (a parsed row file) is not a row the readers can use, or None."""
    if not isinstance(row, dict):
        return f"not a row (a JSON {type(row).__name__})"
    for key in ("backend", "model"):
        if not isinstance(row.get(key), str):
            return f"not a row (no '{key}')" if key not in row else f"'{key}' is not a string"
    if "status" in row and not isinstance(row["status"], str):
        return "'status' is not a string"
    for key in ("batch", "threads", "workers", "repeat"):
        if key in row and row[key] is not None and (not isinstance(row[key], int) or isinstance(row[key], bool)):
            return f"'{key}' is not an integer ({row[key]!r:.40})"
    if "timestamp" in row:
        try:
            datetime.fromisoformat(str(row["timestamp"]))
        except ValueError:
            return f"bad timestamp {row['timestamp']!r:.40}"
    return None


def default_root() -> Path:
    """``$SAMENET_RESULTS``, else ``results/`` of the current folder (never the package's own)."""
    return Path(os.environ.get("SAMENET_RESULTS") or Path.cwd() / "results")


class Store:
    """A folder of result rows: ``<root>/<kind>/<timestamp>-<label>-<key>.json``."""

    def __init__(self, root: str | Path | None = None, kind: str = "bench"):
        self.root = Path(root) if root else default_root()
        self.kind = kind
        self.dir = self.root / kind

    def write(self, row: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        row = {"kind": self.kind, **row}
        row.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        stamp = row["timestamp"].replace(":", "").replace("-", "")[:15]
        # Only the name's characters that are safe in a file name: a model given as a spec
        # path ("specs/lenet5.json") must not become a folder.
        label = file_safe("-".join(str(row.get(k, "")) for k in ("backend", "model", "mode")))
        # A random suffix: a forced re-run of the same cell within the same second must not
        # overwrite the earlier row.
        name = (f"{stamp}-{label}-{str(row.get('cell_key', ''))[:10]}-r{row.get('repeat', 0)}"
                f"-{uuid.uuid4().hex[:6]}.json")
        path = self.dir / name
        tmp = self.dir / f".{name}.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_text(json.dumps(row, default=str, indent=None))
        tmp.replace(path)
        return path

    def rows(self) -> Iterator[dict]:
        """Every row of the store, oldest first; a file that is not a row is skipped with one
        warning naming it (never an exception: one damaged file must not stop a load)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            try:
                row = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                _warn(path, "empty" if path.exists() and not path.stat().st_size else
                      f"not JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            problem = row_problem(row)
            if problem:
                _warn(path, problem)
                continue
            yield row
        now = datetime.now().timestamp()
        for path in self.dir.glob(".*.tmp"):
            try:
                stale = now - path.stat().st_mtime > STALE_TMP_S
            except OSError:
                continue
            if stale:
                _warn(path, "a write that never finished (its process died before the rename)")

    def claim(self, key: str) -> bool:
        """Takes the cell ``key`` for this process (a file created exclusively); False while
        another live process holds it. A claim whose process is gone (same host) is taken over;
        one of another host counts as held for CLAIM_TTL_S."""
        folder = self.dir / ".claims"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_SAFE.sub('_', key)}.claim"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(path.read_text())
                except (OSError, ValueError):
                    held = {}
                if held.get("pid") == me["pid"] and held.get("host") == me["host"]:
                    return True
                if not _stale(held):
                    return False
                path.unlink(missing_ok=True)  # its process died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        return False

    def release(self, key: str) -> None:
        (self.dir / ".claims" / f"{_SAFE.sub('_', key)}.claim").unlink(missing_ok=True)

    def keys(self) -> set[str]:
        return set(self.statuses())

    def statuses(self) -> dict[str, str]:
        """Cell key -> the status of its newest row (rows are named oldest first)."""
        return {r["cell_key"]: r.get("status", "error") for r in self.rows() if "cell_key" in r}


def load(root: str | Path | None = None, kind: str | None = "bench"):
    """All rows of a store as a DataFrame (every kind when ``kind`` is None)."""
    import pandas as pd

    root = Path(root) if root else default_root()
    kinds = [kind] if kind else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    rows = [r for k in kinds for r in Store(root, k).rows()]
    df = pd.DataFrame(rows)
    if not df.empty and "timestamp" in df:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
        df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return df


def latest(df):
    """The newest row per cell configuration (repeats kept apart)."""
    if df.empty:
        return df
    df = df.assign(options_text=df["options"].astype(str)) if "options" in df else df
    if "workers" in df:  # one-process rows predate the column
        df = df.assign(workers_text=df["workers"].fillna(1).astype(int).astype(str) + df["scaling"].fillna("").astype(str)
                       .where(df["workers"].fillna(1) > 1, ""))
    keys = [c for c in ("backend", "model", "mode", "batch", "input", "device", "precision", "exec_mode",
                        "options_text", "threads", "cpu_settings", "workers_text", "repeat", "machine_class") if c in df]
    return df.drop_duplicates(keys, keep="last").drop(columns=["options_text", "workers_text"], errors="ignore")
