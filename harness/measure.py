"""Measurement helpers used inside the cell process: statistics, memory, GPU memory."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import numpy as np

MB = 1024 * 1024


def summarize(samples_ns: list[int]) -> dict[str, float]:
    """Median, p10, p90, mean, min, max, std and IQR of step times, in seconds."""
    s = np.asarray(samples_ns, dtype=np.float64) / 1e9
    if s.size == 0:
        return {}
    p10, p25, p50, p75, p90 = np.percentile(s, [10, 25, 50, 75, 90])
    return {"step_median_s": p50, "step_p10_s": p10, "step_p90_s": p90, "step_iqr_s": p75 - p25,
            "step_mean_s": float(s.mean()), "step_min_s": float(s.min()), "step_max_s": float(s.max()),
            "step_std_s": float(s.std(ddof=1)) if s.size > 1 else 0.0}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """Peak resident set size of this process over its lifetime."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark (VmHWM) so later peaks cover what follows only."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_rss_mb() -> float | None:
    """VmHWM: peak RSS since the last reset_peak_rss (or process start)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def nvml_process_mb(pid: int | None = None) -> float | None:
    """Device memory used by this process per NVML (allocator-neutral), summed over GPUs."""
    pid = pid or os.getpid()
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        total = 0
        found = False
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += proc.usedGpuMemory
                    found = True
        return total / MB if found else None
    except Exception:  # noqa: BLE001  (no NVML here: try nvidia-smi)
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(b) for a, b in (line.split(",") for line in out.stdout.splitlines() if "," in line)
            if int(a) == pid]
    return sum(used) if used else None
