"""The environment a measurement ran in, recorded with every result row."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME",
               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
               "MXNET_CPU_WORKER_NTHREADS", "MXNET_ENGINE_TYPE", "FLAGS_use_mkldnn", "CPU_NUM")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpuinfo() -> list[tuple[str, str]]:
    """/proc/cpuinfo as (key, value) pairs; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines())]


def cpu_model() -> str:
    return next((v for k, v in _cpuinfo() if k == "model name"), None) or platform.processor() or platform.machine()


# The instruction-set extensions that decide which kernels a framework can use: bf16 and int8
# dot products, AMX tiles (x86 /proc/cpuinfo "flags"), their aarch64 counterparts ("Features").
# amp-bf16 is emulated on a CPU without them and native with them: its figures need the set.
CPU_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
           "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_isa() -> str:
    """The extensions of CPU_ISA this CPU has, comma-separated ('' where /proc/cpuinfo says nothing)."""
    flags = {f for k, v in _cpuinfo() if k in ("flags", "Features") for f in v.split()}
    return ",".join(f for f in CPU_ISA if f in flags)


def gpus() -> list[dict]:
    """GPUs seen by nvidia-smi: name, driver, memory (MB)."""
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if not out:
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "driver": parts[1], "memory_mb": float(parts[2])})
    return found


def git_revision() -> tuple[str | None, bool | None]:
    rev = _run(["git", "rev-parse", "--short=12", "HEAD"], ROOT)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT)
    return rev, (None if dirty is None else bool(dirty))


@lru_cache(maxsize=1)
def node_environment() -> dict:
    """This machine: host, OS, Python, CPU, memory, GPUs (once per process)."""
    import psutil

    gpu = gpus()
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu[0]["name"] if gpu else None,
        "gpu_count": len(gpu),
        "gpu_driver": gpu[0]["driver"] if gpu else None,
    }


@lru_cache(maxsize=1)
def sweep_environment() -> dict:
    """What is the same for every cell of a sweep wherever it runs: the checkout's git revision.

    The driver captures it once and hands it to every cell (a Ray task, a Slurm job), so
    nodes neither run git per cell nor need the checkout's .git.
    """
    rev, dirty = git_revision()
    return {"git_revision": rev, "git_dirty": dirty}


def host_environment(sweep: dict | None = None) -> dict:
    """What does not depend on the backend: this machine's, and the sweep's (captured here if not given)."""
    return node_environment() | (sweep if sweep is not None else sweep_environment())


def machine_class() -> str:
    """Timings are only comparable within a class: CPU model x cores (x GPU)."""
    env = node_environment()
    parts = [env["cpu_model"], f"{env['cpu_affinity'] or env['cpu_logical']} cpus"]
    if env["gpu"]:
        parts.append(env["gpu"])
    return " / ".join(parts)


def thread_variables() -> dict[str, str]:
    return {k: os.environ[k] for k in THREAD_VARS if k in os.environ}
