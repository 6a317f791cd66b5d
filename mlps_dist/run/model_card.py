"""The model card of a finished run: RUN/MODEL_CARD.md.

    mlps card --run runs/luad          # writes runs/luad/MODEL_CARD.md

Written by mlps pipeline when the pipeline finishes and copied next to an export by
mlps export. Everything comes from files of the run (config.yaml, metrics/*.json,
metrics/pseudo_masks.json, the model files, pseudo_masks/train/manifest.json) and of its
shards (data.root/info.json); what is missing is said so rather than guessed. Sections:
data, method and settings, results, intended use and limits, software and hardware, how
to reproduce.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import yaml

from mlps_dist.config import load_config
from mlps_dist.core import layout
from mlps_dist.core.fileio import atomic_write_text, sha256_file

PACKAGES = (
    "mlps-dist",
    "torch",
    "deepspeed",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "webdataset",
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return sha256_file(path)


def shards_digest(root: Path, info: dict) -> str:
    """sha256 over info.json and every shard's index file (sample names, sizes, offsets)."""
    h = hashlib.sha256((root / "info.json").read_bytes())
    for split in sorted(info.get("splits", {})):
        for shard in info["splits"][split].get("shards", []):
            idx = root / shard["idx"]
            h.update(idx.read_bytes() if idx.is_file() else b"missing")
    return h.hexdigest()


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _versions() -> str:
    rows = []
    for name in PACKAGES:
        try:
            rows.append(f"| {name} | {metadata.version(name)} |")
        except metadata.PackageNotFoundError:
            pass
    return "\n".join(["| package | version |", "|---|---|", f"| python | {platform.python_version()} |", *rows])


def _hardware() -> str:
    lines = [f"- platform: {platform.platform()}", f"- CPU cores: {os.cpu_count()}"]
    try:
        import torch

        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            lines.append(f"- GPUs on this node: {torch.cuda.device_count()} x {', '.join(names)}")
        else:
            lines.append("- GPUs on this node: none")
    except ImportError:
        lines.append("- GPUs: unknown (torch not installed where the card was written)")
    lines.append("- (the node that wrote this card; the stages' own logs in RUN/log.jsonl record where they ran)")
    return "\n".join(lines)


def data_section(cfg: dict, info: dict | None, root: Path) -> list[str]:
    out = ["## Data", ""]
    if info is None:
        return out + [f"The shards (data.root = `{root}`) were not readable when this card was written.", ""]
    out += [
        f"- shards: `{root}` (format {info.get('format')}), digest `{shards_digest(root, info)[:16]}` "
        f"(sha256 of info.json and the shard indexes)",
        f"- source layout: {info.get('layout')}, converted from `{info.get('source')}`",
        f"- microns per pixel: {info.get('mpp') if info.get('mpp') is not None else 'not recorded'}",
        f"- patches resized to {cfg['data']['image_size'] or 'their stored size'} px for the networks",
        f"- classes: {', '.join(info['classes'])}; ignore index {info.get('ignore_index')}",
        "",
        "| split | patches | patch size | " + " | ".join(info["classes"]) + " |",
        "|---|---|---|" + "---|" * len(info["classes"]),
    ]
    for split, s in info.get("splits", {}).items():
        size = "x".join(str(v) for v in s.get("image_size") or []) or "mixed"
        counts = " | ".join(str(c) for c in s.get("class_counts", []))
        out.append(f"| {split} | {s.get('count')} | {size} | {counts} |")
    return out + ["", "Class columns: patches whose patch-level label contains the class.", ""]


def method_section(run: Path, cfg: dict) -> list[str]:
    manifest = _json(layout.masks_manifest(run)) or {}
    settings = manifest.get("settings") or {}
    masks_sha, masks_pick = settings.get("classifier_sha256"), settings.get("classifier") or {}
    # the gate's stage-1 file (classifier.checkpoint) as evaluation recorded it
    gate_pick = (_json(layout.metrics_file(run, "test")) or _json(layout.metrics_file(run, "val")) or {}).get(
        "classifier"
    )
    gate_pick = gate_pick or masks_pick
    final_classifier = layout.relative(run, layout.model_file(run, "classifier"))  # files made before the choice
    gate_sha = _sha256(layout.resolve(run, gate_pick.get("file") or final_classifier))

    def describe(pick: dict, default: str) -> str:
        where = f"RUN/{pick.get('file') or default}"
        if pick.get("checkpoint"):
            where += (
                f" (classifier.checkpoint={pick['checkpoint']}, epoch {pick.get('epoch')}, "
                f"validation score {_pct(pick.get('score'))} %)"
            )
        return where

    ev = cfg["evaluate"]
    out = [
        "## Method and settings",
        "",
        "MLPS (Han et al., Medical Image Analysis 2022): a multi-label patch classifier "
        f"(`{cfg['classifier']['model']}`, Progressive Dropout Attention from epoch "
        f"{cfg['classifier']['pda']['start_epoch']}), pseudo masks from Grad-CAM at layers "
        f"{', '.join(cfg['masks']['layers'])}, a segmenter (`{cfg['segmenter']['model']}`) trained on the three "
        f"masks (loss weights {cfg['segmenter']['loss_weights']}), and at inference the classification gate "
        f"({'on, threshold ' + str(ev['gate_threshold']) if ev['gate'] else 'off'}).",
        "",
        f"- classifier that fed the pseudo masks: {describe(masks_pick, final_classifier)}, "
        f"sha256 `{(masks_sha or 'unknown')[:16]}`",
        f"- classifier used as the gate: {describe(gate_pick, final_classifier)}, "
        f"sha256 `{(gate_sha or 'missing')[:16]}`"
        + (" (the same file)" if masks_sha and masks_sha == gate_sha else ""),
        f"- segmenter checkpoint evaluated: {ev['checkpoint']}",
        f"- segmenter scores refined along the patch's colours before the argmax: {_refinement(ev)}",
        "",
    ]
    out += [
        "Resolved configuration (RUN/config.yaml):",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return out


def results_section(run: Path) -> list[str]:
    out = ["## Results", ""]
    for split in ("val", "test"):
        record = _json(layout.metrics_file(run, split))
        if record is None:
            out += [f"{split}: not evaluated (no RUN/metrics/{split}.json).", ""]
            continue
        ungated = record.get("ungated", {})
        title = "gated" if record.get("gate") else "result"
        out += [
            f"### {split} ({record.get('samples')} patches), IoU %",
            "",
            f"| | {title} | ungated |",
            "|---|---|---|",
        ]
        out += [
            f"| {name} | {_pct(v)} | {_pct(ungated.get('iou', {}).get(name))} |"
            for name, v in record.get("iou", {}).items()
        ]
        out += [
            f"| **{key}** | {_pct(record.get(key))} | {_pct(ungated.get(key))} |"
            for key in ("miou", "fwiou", "acc", "macc")
        ]
        out.append("")
    pseudo = _json(layout.masks_report_file(run))
    if pseudo:
        out += ["### Pseudo masks against the ground truth (mIoU %)", "", "| split | layer | mIoU |", "|---|---|---|"]
        splits = {k: v for k, v in pseudo.items() if k != "classifier"}  # "classifier": which model made them
        out += [
            f"| {split} | {layer} | {_pct(rec.get('miou'))} |"
            for split, layers in splits.items()
            for layer, rec in layers.items()
            if isinstance(rec, dict)
        ]
        out.append("")
    return out


LIMITS = """## Intended use and limits

- Research use: tissue-class maps of H&E patches and slides for quantification and review
  by a pathologist; not a diagnostic device.
- Trained from patch-level labels only (weak supervision): boundaries come from Grad-CAM
  pseudo masks and are coarser than pixel-level annotations.
- Predicts only the tissue classes listed above; anything else (other tissue types,
  artefacts, pen marks, blur) is assigned to one of them.
- Inputs must be at the training microns per pixel and patch scale; the stain and scanner
  range is that of the training data (no colour normalisation is applied): expect lower
  accuracy on other stains, scanners or laboratories, and check on local data first.
"""


def reproduce_section(run: Path, cfg: dict, info: dict | None) -> list[str]:
    root = cfg["data"]["root"]
    shard_layout = (info or {}).get("layout", "LAYOUT")
    source = (info or {}).get("source", "SOURCE")
    return [
        "## How to reproduce",
        "",
        "```bash",
        f"mlps shards --layout {shard_layout.lower()} --src {source} --out {root}",
        f"mlps pipeline {layout.config_file(run)} {run}",
        f"mlps export --run {run} --out {run}/export",
        f"mlps infer --model {run}/export/model.onnx --input IMAGES --out PREDICTIONS",
        "```",
        "",
        "The pipeline resumes interrupted stages and skips finished ones; the configuration above is the "
        "complete set of settings (overrides included).",
        "",
    ]


def _refinement(evaluate: dict) -> str:
    refine = evaluate["refine"]
    if not refine.get("enabled"):
        return "no"
    return (
        f"yes ({refine['iterations']} iterations, neighbour distances {refine['dilations']}, colour weight "
        f"{refine['colour_weight']}, blur {refine['blur_sigma']} px; evaluate.refine)"
    )


def render(run: str | Path) -> str:
    run = Path(run)
    # Read through the schema: a key the run's config.yaml lacks is its default, an unknown one is named.
    cfg = load_config(layout.config_file(run)).to_dict()
    root = Path(cfg["data"]["root"])
    info = _json(root / "info.json")
    classes = (info or {}).get("classes") or []
    lines = [
        f"# Model card: {run.name}",
        "",
        f"Tissue segmentation of H&E histopathology ({len(classes)} classes: {', '.join(classes) or 'unknown'}), "
        "trained with MLPS from patch-level labels.",
        "",
    ]
    lines += data_section(cfg, info, root)
    lines += method_section(run, cfg)
    lines += results_section(run)
    lines += [LIMITS, "## Software and hardware", "", _versions(), "", _hardware(), ""]
    lines += reproduce_section(run, cfg, info)
    return "\n".join(lines)


def write(run: str | Path) -> Path:
    path = layout.model_card_file(run)
    atomic_write_text(path, render(run))
    return path
