"""Throughput and memory of a training epoch, for the training log.

Measured on every rank, reported by rank 0 (RunLog): images/s over the whole job (every rank's
share of the global batch), seconds per optimizer step, and this rank's peak memory (resident
set; on CUDA also the allocator's peak). Wall time includes data waits, so a loader that cannot
keep up shows here as a lower rate, not as a separate figure.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_rss_mib() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class EpochMeter:
    """start() before the first step of an epoch, done(steps, global_batch) after its last."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._t0 = time.monotonic()
        if self._on_cuda():
            torch.cuda.reset_peak_memory_stats(self.device)

    def done(self, steps: int, global_batch: int) -> dict[str, float]:
        seconds = max(time.monotonic() - self._t0, 1e-9)
        figures = {
            "images_per_s": steps * global_batch / seconds,
            "step_s": seconds / steps if steps else 0.0,
            "peak_rss_mib": peak_rss_mib(),
        }
        if self._on_cuda():
            figures["peak_cuda_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return figures

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()


def describe(figures: dict[str, float]) -> str:
    text = (
        f"{figures['images_per_s']:.1f} images/s, {figures['step_s']:.2f} s/step, "
        f"peak memory {figures['peak_rss_mib']:.0f} MiB"
    )
    if "peak_cuda_mib" in figures:
        text += f" (CUDA {figures['peak_cuda_mib']:.0f} MiB)"
    return text + " on rank 0"
