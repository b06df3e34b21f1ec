"""Peak memory of this process per phase of a step: resident memory (VmHWM) and, with CUDA, device memory.

    memory = PeakMemory()
    memory.start("rollout")   # closes the previous phase, resets the peaks
    ...
    memory.report()           # {"memory/rollout_peak_rss_gb": ..., "memory/train_peak_cuda_gb": ...}, then forgets

Linux resets the resident high-water mark when "5" is written to /proc/self/clear_refs; where that is not
allowed the figure is the peak since the process started (reported as such: memory/peak_rss_is_lifetime = 1).
"""
from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {_STATUS}")


def resident_bytes() -> int:
    """This process's resident set size now."""
    return _status_kib("VmRSS") * 1024


def peak_resident_bytes() -> int:
    """This process's resident high-water mark (since start or the last reset_peak_resident)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_resident() -> bool:
    """Set the high-water mark to the current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    def __init__(self) -> None:
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> (peak RSS bytes, peak CUDA bytes)
        self.phase: str | None = None
        self.lifetime = False

    def start(self, phase: str) -> None:
        """End the current phase (recording its peaks) and start measuring `phase`."""
        self._close()
        self.phase = phase
        self.lifetime = not reset_peak_resident() or self.lifetime
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def _close(self) -> None:
        if self.phase is None:
            return
        cuda = _cuda()
        rss, device = self.peaks.get(self.phase, (0, 0))
        self.peaks[self.phase] = (
            max(rss, peak_resident_bytes()),
            max(device, cuda.max_memory_allocated() if cuda is not None else 0),
        )

    def report(self) -> dict[str, float]:
        """Peaks of every phase since the last report (the current one so far), in GB; then starts over."""
        self._close()
        metrics = {}
        for phase, (rss, device) in self.peaks.items():
            metrics[f"memory/{phase}_peak_rss_gb"] = rss / 1e9
            if _cuda() is not None:
                metrics[f"memory/{phase}_peak_cuda_gb"] = device / 1e9
        if self.lifetime:
            metrics["memory/peak_rss_is_lifetime"] = 1.0
        self.peaks = {}
        if self.phase is not None:
            self.start(self.phase)
        return metrics


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None
