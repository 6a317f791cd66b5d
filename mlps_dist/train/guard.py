"""Training health: a run that diverges or collapses is noticed, rolled back or stopped.

Three symptoms, checked by the shared loop (engine.fit) for both trainers:

- **non-finite loss**: any step's loss is NaN/inf (checked at every log interval);
- **frozen loss**: the mean loss of ``guard.frozen_intervals`` consecutive log intervals
  varies by at most ``guard.frozen_tolerance`` (e.g. every logit 0: the multi-label loss
  sits at ln 2 = 0.6931 and no gradient is left);
- **collapsed validation**: a watched metric (``guard.watch``; the classifier watches its
  score and F1) falls below ``guard.collapse_ratio`` x its best so far, once that best has
  reached ``guard.collapse_min_best``.

Every rank feeds its own step losses; the checks all-reduce them (and the verdict), so all
ranks take the same decision at the same step. The remedy: roll back to the last *good*
checkpoint (the newest epoch-end checkpoint whose epoch passed every check; none = start
afresh), multiply the LR by ``guard.lr_factor`` and continue, at most ``guard.max_rollbacks``
times; then stop with ``TrainingFailed`` (exit status 2) and one message naming the epoch,
the symptom and the config key to change.

The decisions live in ``RUN/<stage>/health.json`` (rollbacks, LR scale), written after the
checkpoints newer than the good one are deleted; the loss window and best values travel in
every checkpoint. A run killed at any moment and relaunched therefore takes the same
decisions and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mlps_dist import dist
from mlps_dist.config import GuardConfig
from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_write_json
from mlps_dist.train.checkpoint import Checkpointer

FROZEN_FLOOR = 1e-3  # a loss frozen below this is a fitted model, not a dead one


class TrainingFailed(MlpsError):
    """Training diverged or collapsed and the rollbacks did not help (exit status 2)."""


class ModelCollapsed(MlpsError):
    """A model file whose recorded validation shows a collapsed model (exit status 2)."""


class RolledBack(Exception):
    """Raised on every rank after a rollback; engine.fit resumes from the good checkpoint."""


def is_collapsed(value: float, best: float, cfg: GuardConfig) -> bool:
    """True when ``value`` is non-finite or below collapse_ratio x ``best`` (once best counts)."""
    if not math.isfinite(value):
        return True
    return best >= cfg.collapse_min_best and value < cfg.collapse_ratio * best


def _agree(flag: bool) -> bool:
    """True on every rank when any rank says True (collective)."""
    return bool(dist.all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)


class TrainingHealth:
    """Per-stage monitor; ``hint(epoch)`` returns the config key to name in a final failure."""

    def __init__(self, cfg: GuardConfig, section: str, decisions_file: Path, ckpts: Checkpointer, log, hint=None):
        self.cfg, self.section, self.ckpts, self.log = cfg, section, ckpts, log
        self.hint = hint or (lambda epoch: f"'{section}.lr'")
        self.path = Path(decisions_file)  # core.layout.health_file
        self.decisions = {"rollbacks": [], "lr_scale": 1.0}
        if self.path.is_file():
            self.decisions = json.loads(self.path.read_text())
        self.window: list[float] = []  # mean loss of the latest log intervals (all ranks)
        self.best: dict[str, float] = {}
        self.below = 0  # validations in a row below collapse_ratio x best
        self.suspect = False  # the last validation was below it: not a rollback target
        self.last_metrics: dict[str, float] = {}
        self.last_epoch = -1
        self._sum, self._count, self._bad = 0.0, 0, 0  # this rank, since the last check

    @property
    def lr_scale(self) -> float:
        return float(self.decisions["lr_scale"])

    # ------------------------------------------------------------ observations

    def add_step_loss(self, loss) -> None:
        """Every step, local: no collective and no host synchronisation (a tensor loss stays
        on its device until the next check)."""
        loss = torch.as_tensor(loss).detach().to(torch.float64).reshape(())
        finite = torch.isfinite(loss)
        self._sum = self._sum + torch.where(finite, loss, torch.zeros_like(loss))
        self._bad = self._bad + (~finite).to(torch.float64)
        self._count += 1

    def _reduce_pending(self) -> tuple[float, float, float]:
        """(sum, count, non-finite count) over all ranks since the last check; resets them."""
        totals = dist.all_reduce_sum(
            torch.stack(
                [torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in (self._sum, self._count, self._bad)]
            )
        )
        self._sum, self._count, self._bad = 0.0, 0, 0
        return tuple(float(v) for v in totals)

    def check_losses(self, epoch: int, step: int) -> None:
        """Collective, at a log interval and at the epoch end: raises RolledBack/TrainingFailed."""
        total, count, bad = self._reduce_pending()
        if count == 0:
            return
        symptom = None
        if bad > 0:
            symptom = f"non-finite loss in {int(bad)} of {int(count)} rank-steps"
        else:
            mean = total / count
            self.window = (self.window + [mean])[-self.cfg.frozen_intervals :]
            spread = max(self.window) - min(self.window)
            if (
                len(self.window) == self.cfg.frozen_intervals
                and spread <= self.cfg.frozen_tolerance
                and mean >= FROZEN_FLOOR
            ):
                symptom = (
                    f"loss frozen at {mean:.4f} for {self.cfg.frozen_intervals} log intervals "
                    f"(0.6931 = ln 2 means every logit is 0)"
                )
        if self.cfg.enabled and _agree(symptom is not None):
            self._fail(symptom or "a failure on another rank", epoch, step)

    def check_validation(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        """Collective, after validation (metrics are already all-reduced, so equal on all ranks).
        A collapse is ``collapse_patience`` validations in a row below ``collapse_ratio`` x the
        best (a non-finite metric at once): one noisy dip on a small validation set is not."""
        collapsed = [
            (k, metrics[k], self.best.get(k, -math.inf))
            for k in self.cfg.watch
            if k in metrics and is_collapsed(float(metrics[k]), self.best.get(k, -math.inf), self.cfg)
        ]
        self.last_metrics, self.last_epoch = {k: float(v) for k, v in metrics.items()}, epoch
        self.below = self.below + 1 if collapsed else 0
        self.suspect = bool(collapsed)
        nonfinite = any(not math.isfinite(float(v)) for _, v, _ in collapsed)
        if collapsed and (self.below >= self.cfg.collapse_patience or nonfinite) and self.cfg.enabled and _agree(True):
            self._fail(
                "validation collapsed: "
                + ", ".join(f"{k} {v:.4f} (best {b:.4f})" for k, v, b in collapsed)
                + (f" for {self.below} validations in a row" if self.below > 1 else ""),
                epoch,
                step,
            )
        if not collapsed:
            for k in self.cfg.watch:
                if k in metrics and math.isfinite(float(metrics[k])):
                    self.best[k] = max(self.best.get(k, -math.inf), float(metrics[k]))

    def mark_good(self, path: Path) -> None:
        """The epoch-end checkpoint ``path`` passed every check: the next rollback target."""
        if self.cfg.enabled and not self.suspect:
            self.ckpts.mark_good(path)

    # ------------------------------------------------------------ decisions

    def _fail(self, symptom: str, epoch: int, step: int) -> None:
        done = len(self.decisions["rollbacks"])
        if done >= self.cfg.max_rollbacks:
            tried = f" after {done} rollback(s) with the LR scaled to {self.lr_scale:g}x" if done else ""
            raise TrainingFailed(
                f"{self.section} training failed at epoch {epoch} (step {step}): {symptom}{tried}; "
                f"change {self.hint(epoch)} (or raise '{self.section}.guard.max_rollbacks'); "
                f"no model file was written for this stage"
            )
        good = self.ckpts.good()
        scale = self.lr_scale * self.cfg.lr_factor
        record = {
            "epoch": epoch,
            "step": step,
            "symptom": symptom,
            "to": good.name if good else None,
            "lr_scale": scale,
        }
        if dist.is_main():
            self.ckpts.rewind(good)  # first: a crash here replays to the same failure
            self.decisions = {"rollbacks": self.decisions["rollbacks"] + [record], "lr_scale": scale}
            atomic_write_json(self.path, self.decisions)
        dist.barrier()
        self.log.info(
            f"{self.section}: {symptom} at epoch {epoch} step {step}; rolling back to "
            f"{good.name if good else 'the start'} with the LR scaled to {scale:g}x "
            f"(rollback {done + 1} of at most {self.cfg.max_rollbacks})"
        )
        self.log.event("rollback", **record)
        raise RolledBack(symptom)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Collective (the pending step losses of all ranks are folded into rank 0's share)."""
        total, count, bad = self._reduce_pending()
        if dist.is_main():
            self._sum, self._count, self._bad = total, int(count), int(bad)
        return {
            "window": list(self.window),
            "best": dict(self.best),
            "pending": [total, count, bad],
            "below": self.below,
            "suspect": self.suspect,
            "last_metrics": dict(self.last_metrics),
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.window = [float(v) for v in state["window"]]
        self.best = {k: float(v) for k, v in state["best"].items()}
        self.below, self.suspect = int(state.get("below", 0)), bool(state.get("suspect", False))
        self.last_metrics = {k: float(v) for k, v in state["last_metrics"].items()}
        self.last_epoch = int(state["last_epoch"])
        total, count, bad = state["pending"]
        self._sum, self._count, self._bad = (float(total), int(count), int(bad)) if dist.is_main() else (0.0, 0, 0)

    def model_meta(self) -> dict:
        """What a model file records about the run's health (checked again by its consumers)."""
        nonfinite = any(not math.isfinite(self.last_metrics[k]) for k in self.cfg.watch if k in self.last_metrics)
        collapsed = nonfinite or self.below >= self.cfg.collapse_patience
        return {
            "collapsed": collapsed,
            "rollbacks": len(self.decisions["rollbacks"]),
            "lr_scale": self.lr_scale,
            "best": dict(self.best),
            "watch": list(self.cfg.watch),
            "collapse_ratio": self.cfg.collapse_ratio,
            "collapse_min_best": self.cfg.collapse_min_best,
        }

    def check_final(self, epoch: int) -> dict:
        """Before the final model file: refuse a collapsed model whatever ``enabled`` says."""
        meta = self.model_meta()
        if meta["collapsed"]:
            raise TrainingFailed(
                f"{self.section} training ended with a collapsed model at epoch {epoch} "
                f"(validation {self.last_metrics}, best {self.best}); change {self.hint(epoch)} or turn "
                f"'{self.section}.guard.enabled' on to roll back; no model file was written"
            )
        return meta


def refuse_collapsed(meta: dict, path: Path | str, section: str = "classifier") -> None:
    """ModelCollapsed when a model file's recorded validation is collapsed (consumers call it)."""
    health = meta.get("health") or {}
    metrics = meta.get("metrics") or {}
    cfg = GuardConfig(
        collapse_ratio=float(health.get("collapse_ratio", 0.5)),
        collapse_min_best=float(health.get("collapse_min_best", 0.2)),
    )
    best = health.get("best") or {}
    bad = [
        k
        for k in health.get("watch", ["score"])
        if k in metrics and is_collapsed(float(metrics[k]), float(best.get(k, -math.inf)), cfg)
    ]
    if health.get("collapsed") or bad:
        raise ModelCollapsed(
            f"{path} records a collapsed model (epoch {meta.get('epoch')}, validation "
            f"{ {k: metrics[k] for k in bad} or metrics }, best {best}); it is not used downstream. Retrain the "
            f"{section} stage (see '{section}.guard.*') or set '{section}.checkpoint' to the other choice"
        )
