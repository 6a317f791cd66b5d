"""Atomic, resumable training checkpoints and the plain final model files.

A training checkpoint is a folder ``RUN/<stage>/checkpoints/step-NNNNNNNN/`` holding a
dict of stateful objects under fixed keys:

    state.pt        (rank 0)  model, optimizer, scheduler, scaler   [DDP]
                              progress (epoch, step_in_epoch, global_step, best_score),
                              task (e.g. the PDA gamma), config, meta (model name, classes)
    ds/             (DeepSpeed) the engine's own checkpoint: model, optimizer shards, scheduler
    rng-rank<R>.pt  (every rank) torch / cuda / numpy / python RNG states of that rank

Every rank writes into ``step-NNNNNNNN.tmp/``; after a barrier rank 0 fsyncs, renames the
folder (the commit point), replaces the ``latest`` marker atomically and keeps the last k.
A crash at any moment leaves the previous checkpoint intact and ``latest`` pointing to a
complete folder. Everything is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlps_dist import dist
from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_open, atomic_write_text

LATEST = "latest"
GOOD = "good"  # names the newest checkpoint the training guard accepted (never pruned)


class CheckpointError(MlpsError, ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


# ---------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write ``path`` so that readers see the old file or the complete new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what} {path} does not exist") from exc
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(
            f"{what} {path} cannot be read ({type(exc).__name__}: {exc}); "
            "it is damaged or not a file this program wrote"
        ) from exc


# ---------------------------------------------------------------- final model files


def save_model_file(path: str | Path, model_state_dict: dict, meta: dict) -> None:
    """A plain artefact: {"state_dict", "meta"} (meta: name, num_classes, classes, config)."""
    state = {k: v.detach().cpu() for k, v in model_state_dict.items()}
    atomic_torch_save({"state_dict": state, "meta": dict(meta)}, path)


def load_model_file(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    blob = _load(path, "model file")
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise CheckpointError(f"model file {path} lacks 'state_dict'/'meta'; write it with save_model_file")
    return blob["state_dict"], blob["meta"]


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- DeepSpeed files

DS_DIGESTS = "ds-files.json"


def _ds_digests(folder: Path) -> dict[str, str]:
    from mlps_dist.run.artifacts import sha256_file

    ds = folder / "ds"
    return {str(p.relative_to(ds)): sha256_file(p) for p in sorted(ds.rglob("*")) if p.is_file()}


def _write_ds_digests(folder: Path) -> None:
    """Rank 0, after every rank wrote ``ds/``: the sha256 of each file, beside them."""
    from mlps_dist.core.fileio import atomic_write_json

    atomic_write_json(folder / DS_DIGESTS, {"written_by": "mlps-dist", "files": _ds_digests(folder)})


def _ds_safe_globals() -> list:
    """The classes DeepSpeed's ZeRO 0-2 checkpoints store besides tensors and builtins: the
    only ones the restricted unpickler accepts."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


class _WeightsOnlyEngine:
    """DeepSpeed's checkpoint engine with every read through ``torch.load(weights_only=True)``
    and the allow-list above (DeepSpeed's own reader unpickles with ``weights_only=False``,
    which runs whatever code a crafted file holds)."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(_ds_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: DeepSpeed checkpoint file refused: it holds objects other than tensors "
                f"and DeepSpeed's recorded state ({first[:200]}); it is not loaded. Delete its "
                f"step folder to resume from an older checkpoint"
            ) from exc

    def __getattr__(self, name):
        return getattr(self.inner, name)


def load_deepspeed_state(engine, folder: Path):
    """``engine.load_checkpoint(folder, tag="state")`` with the weights-only reader."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyEngine(original)
    try:
        return engine.load_checkpoint(
            str(folder), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine.checkpoint_engine = original


def _check_ds_digests(path: Path) -> None:
    """Load only a folder whose files match the digests this program recorded when it wrote
    them (a check against damage and mix-ups; what keeps a crafted file from running code is
    the weights-only reader of load_deepspeed_state)."""
    import json

    try:
        recorded = json.loads((path / DS_DIGESTS).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} has no readable {DS_DIGESTS}: not a DeepSpeed checkpoint written by this "
            f"program (or one from an older release); it is not loaded. Delete {path} to resume "
            f"from an older checkpoint or restart the stage"
        ) from exc
    if recorded.get("written_by") != "mlps-dist" or recorded.get("files") != _ds_digests(path):
        raise CheckpointError(
            f"{path / 'ds'} does not match the digests in {path / DS_DIGESTS}: the files were "
            f"changed after this program wrote them; it is not loaded. Delete {path} to resume "
            f"from an older checkpoint"
        )


# ---------------------------------------------------------------- training checkpoints


def _is_complete(path: Path) -> bool:
    """A committed checkpoint folder holds state.pt (written before the commit rename)."""
    return (path / "state.pt").is_file()


def _step_dirs(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    dirs = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


class Checkpointer:
    def __init__(self, folder: str | Path, keep_last: int = 2):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh run: the folder ``latest``
        names, or, when the marker is missing or names a folder that is gone (a crash
        between the rename and the marker, a copy without it), the newest complete one."""
        marker = self.folder / LATEST
        if marker.is_file():
            path = self.folder / marker.read_text().strip()
            if path.is_dir() and _is_complete(path):
                return path
        complete = [p for p in _step_dirs(self.folder) if _is_complete(p)] if self.folder.is_dir() else []
        return complete[-1] if complete else None

    def save(self, global_step: int, model, client_state: dict) -> Path:
        """Collective: every rank calls it with the same step. ``model`` is a parallel.Wrapped."""
        final = self.folder / f"step-{global_step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if dist.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crash mid-save
            tmp.mkdir()
        dist.barrier()
        state = dict(client_state)
        if model.kind == "deepspeed":
            model.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
        else:
            state.update(
                model=model.module.state_dict(),
                optimizer=model.optimizer.state_dict(),
                scheduler=model.scheduler.state_dict(),
                scaler=model.scaler.state_dict(),
            )
        if dist.is_main():
            _save_synced(state, tmp / "state.pt")
        _save_synced(rng_state(), tmp / f"rng-rank{dist.get_rank()}.pt")
        dist.barrier()
        if dist.is_main():
            if model.kind == "deepspeed":
                _write_ds_digests(tmp)
            for sub in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
                _fsync_dir(sub)
            if final.exists():  # same step committed before a crash hid it from `latest`
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.folder)
            atomic_write_text(self.folder / LATEST, final.name)
            self._prune(keep=final)
        dist.barrier()
        return final

    def good(self) -> Path | None:
        """The newest checkpoint the training guard marked as healthy, or None."""
        marker = self.folder / GOOD
        if not marker.is_file():
            return None
        path = self.folder / marker.read_text().strip()
        return path if path.is_dir() else None

    def mark_good(self, path: Path) -> None:
        """Rank 0: ``path`` becomes the rollback target; kept whatever keep_last says."""
        if dist.is_main():
            atomic_write_text(self.folder / GOOD, path.name)

    def rewind(self, to: Path | None) -> None:
        """Rank 0: make ``to`` the checkpoint to resume from (None: start afresh) and delete
        every newer one. ``latest`` moves first, so a crash part-way leaves a resumable folder."""
        if not dist.is_main():
            return
        if to is None:
            (self.folder / LATEST).unlink(missing_ok=True)
            (self.folder / GOOD).unlink(missing_ok=True)
        else:
            atomic_write_text(self.folder / LATEST, to.name)
        keep_step = -1 if to is None else int(to.name.split("-")[1])
        for path in _step_dirs(self.folder):
            if int(path.name.split("-")[1]) > keep_step:
                shutil.rmtree(path, ignore_errors=True)
        if self.folder.is_dir():
            _fsync_dir(self.folder)

    def _prune(self, keep: Path) -> None:
        complete = _step_dirs(self.folder)
        good = self.good()
        for old in complete[: -self.keep_last]:
            if old != keep and old != good:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def check(self, path: Path, expect_meta: dict) -> dict:
        """Read ``path``/state.pt and compare its meta with ``expect_meta``; return the state."""
        state = _load(path / "state.pt", "checkpoint")
        saved = state.get("meta") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or "progress" not in state:
            raise CheckpointError(
                f"checkpoint {path / 'state.pt'} is not a training checkpoint of this program; "
                f"delete {path} to resume from an older one"
            )
        for key, want in expect_meta.items():
            if saved.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {path} was written for {key}={saved.get(key)!r}, this run has {key}={want!r}; "
                    f"use another run_dir or delete {self.folder} to start afresh"
                )
        return state

    def load(self, path: Path, model, expect_meta: dict) -> dict:
        """Restore ``model`` (a parallel.Wrapped) and this rank's RNG; return the client state
        (progress, task, config, meta). Raises CheckpointError before touching the model when
        the checkpoint is unreadable or belongs to another model."""
        state = self.check(path, expect_meta)
        if model.kind == "deepspeed":
            _check_ds_digests(path)  # damaged or mixed-up files are refused before DeepSpeed reads them
            loaded, _ = load_deepspeed_state(model.engine, path / "ds")  # weights_only=True, allow-listed
            if loaded is None:
                raise CheckpointError(f"checkpoint {path / 'ds'} could not be loaded by DeepSpeed")
        else:
            model.module.load_state_dict(state["model"])
            model.optimizer.load_state_dict(state["optimizer"])
            model.scheduler.load_state_dict(state["scheduler"])
            model.scaler.load_state_dict(state["scaler"])
        rng_file = path / f"rng-rank{dist.get_rank()}.pt"
        if rng_file.is_file():  # absent when the world grew; the loaders do not depend on it
            set_rng_state(_load(rng_file, "checkpoint RNG state"))
        return {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "scaler")}
