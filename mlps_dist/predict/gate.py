"""Classification gate and loading of the trained models for stage 4.

The stage-1 classifier says which tissue classes a patch contains. At inference the
segmenter's logits of classes the classifier rules out (sigmoid probability <=
``evaluate.gate_threshold``, 0.1 in the paper) are set to -inf before the argmax, so those
classes cannot be predicted anywhere in the patch. (The public code multiplies the
probabilities by 0 instead, which still lets a gated class win where every logit is
negative; -inf cannot.)

All classes gated off: when the classifier rules out every class of a patch (or, for
sliding windows, of a pixel), there is nothing left to choose from; such a patch/pixel
keeps its *ungated* prediction rather than an arbitrary class 0.

    allowed = allowed_classes(torch.sigmoid(classifier(x)), threshold=0.1)   # (B, C) bool
    pred = apply_gate(seg_logits, allowed).argmax(1)
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlps_dist.core import layout
from mlps_dist.models import create_classifier, create_segmenter
from mlps_dist.train.checkpoint import load_model_file
from mlps_dist.train.guard import refuse_collapsed


def allowed_classes(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, C) classifier probabilities -> (B, C) bool: class kept when p > threshold."""
    return probs > threshold


def apply_gate(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set the logits of classes that are not allowed to -inf.

    ``logits``: (B, C, H, W). ``allowed``: (B, C) per patch or (B, C, H, W) per pixel.
    Where no class is allowed the logits are returned unchanged (ungated fallback).
    """
    if allowed.ndim == 2:
        allowed = allowed[:, :, None, None]
    allowed = allowed.to(logits.device).expand_as(logits)
    nothing_left = ~allowed.any(dim=1, keepdim=True)
    keep = allowed | nothing_left
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------- trained models


def _load(path: Path, factory, what: str, num_classes: int | None, device) -> tuple[torch.nn.Module, dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run the {what} stage first (or point run_dir at a run that has it)"
        )
    state, meta = load_model_file(path)
    if num_classes is not None and int(meta["num_classes"]) != num_classes:
        raise ValueError(
            f"{path} was trained for {meta['num_classes']} classes {meta.get('classes')}, "
            f"but the data has {num_classes}; use a run trained on this dataset"
        )
    extra = {"multi_grid": meta.get("multi_grid", [])} if factory is create_segmenter else {}  # [] = before multi-grid
    model = factory(meta["name"], int(meta["num_classes"]), **extra)
    model.load_state_dict(state)
    return model.to(device).eval(), {**meta, "path": str(path)}


def load_segmenter(
    run_dir: str | Path, checkpoint: str = "best", num_classes: int | None = None, device="cpu"
) -> tuple[torch.nn.Module, dict]:
    """RUN/segmenter/best.pt (``checkpoint="best"``, falling back to model.pt when no best
    exists) or RUN/segmenter/model.pt (``"last"``); refuses while stage 3 is unfinished."""
    final = layout.model_file(run_dir, "segmenter")
    if not final.is_file():
        # best.pt appears during training; using it before the stage is finished would
        # report on a model that is still changing.
        raise FileNotFoundError(
            f"{final} does not exist: stage 3 is not finished; run (or resume) "
            f"the segmenter stage (mlps_dist.stages.train_segmenter) first"
        )
    path = layout.chosen_model_file(run_dir, "segmenter", checkpoint)
    return _load(path, create_segmenter, "segmenter (mlps_dist.stages.train_segmenter)", num_classes, device)


def classifier_choice(run_dir: str | Path) -> str:
    """``classifier.checkpoint`` of the run's resolved config (RUN/config.yaml); "best" if absent."""
    path = layout.config_file(run_dir)
    if path.is_file():
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
        return str((values.get("classifier") or {}).get("checkpoint", "best"))
    return "best"


def load_classifier(
    run_dir: str | Path, num_classes: int | None = None, device="cpu", checkpoint: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """The stage-1 classifier for downstream use (pseudo masks, the gate, inference, figures):
    RUN/classifier/best.pt (``checkpoint="best"``: the best validation score; model.pt when
    no epoch was validated) or RUN/classifier/model.pt (``"last"``). None reads
    ``classifier.checkpoint`` from the run's config.yaml. Refuses while stage 1 is unfinished
    and refuses a file whose recorded validation is collapsed (guard.ModelCollapsed).
    ``meta["selection"]`` = {"checkpoint", "file" (relative to the run dir), "epoch", "score"}:
    what the consumers record."""
    checkpoint = checkpoint or classifier_choice(run_dir)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"'classifier.checkpoint' must be 'best' or 'last', got '{checkpoint}'")
    final = layout.model_file(run_dir, "classifier")
    if not final.is_file():
        raise FileNotFoundError(
            f"{final} does not exist: stage 1 is not finished; run the classifier "
            f"stage (mlps_dist.stages.train_classifier) first, or resume it"
        )
    path = layout.chosen_model_file(run_dir, "classifier", checkpoint)
    model, meta = _load(path, create_classifier, "classifier (mlps_dist.stages.train_classifier)", num_classes, device)
    refuse_collapsed(meta, path, "classifier")
    if hasattr(model, "pda_gamma"):
        model.pda_gamma = None  # PDA is a training-time regulariser only
    metrics = meta.get("metrics") or {}
    meta["selection"] = {
        "checkpoint": checkpoint,
        "file": layout.relative(run_dir, path),
        "epoch": meta.get("epoch"),
        "score": metrics.get("score"),
    }
    return model, meta
