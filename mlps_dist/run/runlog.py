"""Rank-0 run logging: console, JSONL, TensorBoard and progress lines.

Producers (trainers, the mask pass, evaluation) call one ``RunLog``; it decides what to
write and where. Every rank may call it; only rank 0 writes, so callers need no
``if rank == 0`` branches.

    log = RunLog(cfg.run_dir, stage="classifier")
    log.info("epoch 0 done")
    log.scalars({"loss": 0.3, "lr": 1e-2}, step=10)   # -> TensorBoard + RUN/log.jsonl
    log.image("cam/TE", chw_uint8, step=10)
    for batch in log.progress(loader, total=len(loader), desc="epoch 0"):
        ...
    log.close()
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mlps_dist import dist
from mlps_dist.core import layout
from mlps_dist.core.progress import Progress


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunLog:
    def __init__(self, run_dir: str | Path, stage: str, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.enabled = dist.is_main()
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(layout.log_file(self.run_dir), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a bare GPU node image: log.jsonl and stderr still record everything
                self.info("tensorboard is not installed: no TensorBoard events for this stage")
            else:
                self._tb = SummaryWriter(log_dir=str(layout.tensorboard_dir(self.run_dir, stage)))

    # -------------------------------------------------------------- text
    def info(self, message: str) -> None:
        if self.enabled:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp} {self.stage}] {message}", file=sys.stderr, flush=True)

    def event(self, kind: str, **fields: Any) -> None:
        """One structured record in RUN/log.jsonl (stage, kind, wall time, fields)."""
        if self._jsonl is not None:
            record = {"time": round(time.time(), 3), "stage": self.stage, "kind": kind, **fields}
            self._jsonl.write(json.dumps(_jsonable(record)) + "\n")

    # -------------------------------------------------------------- TensorBoard
    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for tag, value in clean.items():
                self._tb.add_scalar(tag, value, step)
        self.event("scalars", step=step, **clean)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: HxWx3 or 3xHxW, uint8 or float in [0, 1]."""
        if self._tb is None:
            return
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        self._tb.add_image(tag, arr, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    # -------------------------------------------------------------- progress
    def progress(
        self, iterable: Iterable, total: int | None = None, desc: str = "", initial: int = 0, unit: str = "steps"
    ):
        """Progress on rank 0 (stderr: a redrawn line on a terminal, a plain line every 30 s in
        a log file); the bare iterable elsewhere."""
        if not self.enabled:
            return iterable
        return Progress(f"{self.stage} {desc}".strip(), total, unit, initial=initial).wrap(iterable)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Plain fixed-width table for console summaries (metrics, benchmarks)."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
