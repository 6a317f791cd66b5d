"""Stage 2: multi-layer pseudo masks for every training patch, exactly once, resumable.

    mlps stage masks CONFIG RUN   # this node: one process per GPU
    torchrun --nproc-per-node 2 -m mlps_dist -- masks CONFIG --run RUN
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m mlps_dist -- masks configs/luad.yaml --run runs/luad
    python -m mlps_dist masks configs/demo.yaml --run runs/demo masks.batch_size=8   # one process

Reads RUN/classifier/model.pt and the train shards of data.root; writes
RUN/pseudo_masks/train/masks-NNNNNN.{tar,idx} (one chunk per masks.chunk_size samples) and
manifest.json, and a quality report of the same masks on masks.quality_splits (ground-truth
masks needed) into RUN/metrics/pseudo_masks.json and TensorBoard (RUN/tb/masks).

The chunks not yet committed are shared out over the ranks; a rerun after a crash or a
preemption, with the same or another number of ranks, makes only the missing chunks. A run
over a finished pass says so and exits 0. Bad samples (undecodable patch, wrong size, no
class label) stop the pass with their key, or with masks.skip_bad=true get an all-ignore
mask and are listed under "skipped" in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlps_dist import dist
from mlps_dist.config import Config
from mlps_dist.core import layout, png
from mlps_dist.core.fileio import atomic_write_bytes, sha256_file
from mlps_dist.core.records import flatten
from mlps_dist.data.augment import model_input
from mlps_dist.data.loaders import create_masks_loader, split_batches
from mlps_dist.data.pseudo_masks import (
    PseudoMaskError,
    check_manifest,
    chunk_indices,
    chunk_stem,
    committed_chunks,
    new_manifest,
    num_chunks,
    read_manifest,
    refresh_manifest,
    remove_debris,
    write_chunk,
    write_json,
)
from mlps_dist.data.shards import SplitReader, open_split, read_info
from mlps_dist.method import cam
from mlps_dist.run.runlog import RunLog
from mlps_dist.stages import session
from mlps_dist.train import gpu_options


def check_split(reader: SplitReader) -> None:
    """Refuse shards that cannot give pseudo masks before any work starts."""
    where = f"{reader.root} (split '{reader.split}')"
    if len(reader) == 0:
        raise PseudoMaskError(f"{where} holds no samples; check data.root")
    if "labels" not in reader.read(0):
        raise PseudoMaskError(
            f"{where} has no 'labels' members: the mask pass needs patch-level labels; "
            f"rebuild the shards with mlps shards"
        )


def load_classifier(cfg: Config, reader: SplitReader, device: torch.device):
    """The stage-1 classifier chosen by ``classifier.checkpoint`` (gate.load_classifier: the
    one loader every consumer shares), checked against the shards' classes and the CAM
    layers. Returns (model, path, selection record)."""
    from mlps_dist.predict import gate

    try:
        model, meta = gate.load_classifier(cfg.run_dir, device="cpu", checkpoint=cfg.classifier.checkpoint)
    except FileNotFoundError as exc:
        raise PseudoMaskError(f"{exc} (or set run_dir to the run that holds it)") from exc
    except RuntimeError as exc:
        raise PseudoMaskError(f"the stage-1 classifier in {cfg.run_dir} does not fit its model ({exc})") from exc
    path = Path(meta["path"])
    if list(meta.get("classes", [])) != reader.classes:
        raise PseudoMaskError(
            f"{path} was trained on classes {meta.get('classes')}, but {cfg.data.root} has "
            f"{reader.classes}; use the classifier trained on these shards"
        )
    try:
        cam.check_layers(model, list(cfg.masks.layers))
    except ValueError as exc:
        raise PseudoMaskError(f"{path}: {exc}") from exc
    cam.prepare_model(model)
    return model.to(device), path, meta["selection"]


def mask_settings(cfg: Config, reader: SplitReader, model_path: Path, selection: dict | None = None) -> dict:
    """Everything the masks depend on; a change makes the existing chunks unusable.
    ``selection``: which stage-1 classifier made them (classifier.checkpoint, file, epoch, score)."""
    return {
        "classifier_sha256": sha256_file(model_path),
        "classifier": selection or {},
        "classes": reader.classes,
        "count": len(reader),
        **config_settings(cfg),
    }


def config_settings(cfg: Config) -> dict:
    """The part of ``mask_settings`` the config decides (of Config(): the defaults that a
    manifest written before a key existed counts as having)."""
    m = cfg.masks
    settings = {
        "layers": list(m.layers),
        "chunk_size": m.chunk_size,
        "background": vars(m.background).copy(),
        "tta_flip": m.tta_flip,
        "tta_scales": list(m.tta_scales),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "image_size": cfg.data.image_size,
    }
    if m.refine.enabled:  # refined masks differ from plain ones: never mixed in one folder
        settings["refine"] = vars(m.refine).copy()
    return settings  # not skip_bad: turning it on to get past a bad sample keeps the rest


def prepare_folder(folder: Path, split: str, settings: dict) -> list[int] | None:
    """Check/create the manifest; the chunks still to make, or None when the pass is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is not None:
        check_manifest(folder, manifest, settings, flatten(config_settings(Config())))
        if manifest.get("complete") and committed_chunks(folder) >= set(range(manifest["num_chunks"])):
            return None  # finished: leave every file as it is
    else:
        manifest = new_manifest(split, settings)
    remove_debris(folder)
    manifest = refresh_manifest(folder, manifest, complete=False)
    return sorted(set(range(manifest["num_chunks"])) - set(manifest["done"]))


def export_reference(
    run_dir: str, layers: list[str], sources: list[str], masks: list[list[np.ndarray]], palette: list[list[int]]
) -> None:
    """The public code's layout: train_PM/PM_<layer>/<source file name>.png, palettised."""
    for layer_no, layer in enumerate(layers):
        out = layout.reference_masks_dir(run_dir, layer)
        out.mkdir(parents=True, exist_ok=True)
        for source, per_layer in zip(sources, masks):
            atomic_write_bytes(out / Path(source).name, png.encode_indices(per_layer[layer_no], palette))


def make_batch_masks(model, batch: dict, cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """Masks of a batch on the CPU; samples flagged bad get the ignore index everywhere."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("image", "labels", "rgb")}
    inputs["image"] = model_input(inputs["image"], cfg.data.image_size)  # the scale the classifier learnt
    masks = {k: v.cpu() for k, v in cam.make_masks_cfg(model, inputs, cfg.masks).items()}
    bad = batch["bad"].cpu().bool()
    if bad.any():
        for v in masks.values():
            v[bad] = batch["labels"].shape[1]
    return masks


def run_pass(cfg: Config, log: RunLog, model, reader: SplitReader, device: torch.device, settings: dict) -> bool:
    """Make the missing chunks of the train split; False when the pass was already complete."""
    folder = layout.masks_dir(cfg.run_dir, reader.split)
    todo = dist.on_rank0(lambda: prepare_folder(folder, reader.split, settings))
    if todo is None:
        log.info(f"pseudo masks in {folder} are complete ({settings['count']} samples); nothing to do")
        return False
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [todo[i] for i in dist.partition(len(todo), world, rank)]
    log.info(f"{len(todo)} of {num_chunks(len(reader), cfg.masks.chunk_size)} chunks to make over {world} rank(s)")
    chunk_of = {}
    batches = []
    for chunk in mine:
        indices = chunk_indices(chunk, cfg.masks.chunk_size, len(reader))
        batches += split_batches(reader, indices, cfg.masks.batch_size)
        chunk_of.update({i: chunk for i in indices})
    layers, palette = list(cfg.masks.layers), reader.info["palette"]
    pending: dict[int, dict] = {}
    loader = create_masks_loader(cfg, reader, batches, device, skip_bad=cfg.masks.skip_bad)
    for batch in log.progress(loader, total=len(batches), desc="masks"):
        masks = make_batch_masks(model, batch, cfg, device)
        for j, index in enumerate(batch["index"].tolist()):
            entry = pending.setdefault(chunk_of[index], {"samples": [], "arrays": [], "sources": [], "skipped": {}})
            arrays = [masks[layer][j].numpy() for layer in layers]
            entry["samples"].append((batch["key"][j], [png.encode_indices(a) for a in arrays]))
            entry["arrays"].append(arrays)
            entry["sources"].append(batch["source"][j])
            if batch["why"][j]:
                entry["skipped"][batch["key"][j]] = batch["why"][j]
        chunk = chunk_of[batch["index"][-1].item()]
        if len(pending[chunk]["samples"]) == len(chunk_indices(chunk, cfg.masks.chunk_size, len(reader))):
            entry = pending.pop(chunk)
            if cfg.masks.export_reference:
                export_reference(cfg.run_dir, layers, entry["sources"], entry["arrays"], palette)
            write_chunk(folder, chunk, entry["samples"], layers, entry["skipped"])
            for _key, why in entry["skipped"].items():
                log.info(f"skipped (all-ignore mask): {why}")
            if dist.is_main():  # progress visible in the manifest while the pass runs
                refresh_manifest(folder, read_manifest(folder))
    dist.barrier()
    return True


def finish_pass(cfg: Config, log: RunLog, split: str) -> None:
    folder = layout.masks_dir(cfg.run_dir, split)
    manifest = read_manifest(folder)
    missing = sorted(set(range(manifest["num_chunks"])) - committed_chunks(folder))
    if missing:
        raise PseudoMaskError(
            f"{folder}: chunks {[chunk_stem(c) for c in missing]} are missing after the pass; "
            f"rerun the mask pass to make them (mlps stage masks CONFIG RUN)"
        )
    manifest = refresh_manifest(folder, manifest, complete=True)
    log.event("pseudo_masks_done", folder=str(folder), count=manifest["count"], skipped=len(manifest["skipped"]))
    log.info(
        f"pseudo masks complete: {manifest['count']} samples in {folder}"
        + (f", {len(manifest['skipped'])} skipped (see manifest.json)" if manifest["skipped"] else "")
    )


def quality_report(cfg: Config, log: RunLog, model, device: torch.device, selection: dict | None = None) -> dict:
    """mIoU / per-class IoU of the pseudo masks on splits with ground truth, per layer."""
    from mlps_dist.method.evaluation import CamEvaluator, run_eval

    report = {}
    info_splits = read_info(cfg.data.root)["splits"]
    for split in cfg.masks.quality_splits:
        if split not in info_splits or not info_splits[split].get("has_masks"):
            log.info(f"no quality report for split '{split}': it is absent or has no ground-truth masks")
            continue
        reader = open_split(cfg.data.root, split)
        classes = reader.num_classes
        batches = split_batches(
            reader, dist.partition(len(reader), dist.get_world_size(), dist.get_rank()), cfg.masks.batch_size
        )
        # A diagnostic only: a val patch that cannot be masked (e.g. without any label) is
        # scored as all-ignore instead of stopping the pass on every rerun.
        loader = create_masks_loader(cfg, reader, batches, device, skip_bad=True)
        # Pixels painted white/ignore by the mask pass count as misses (CamEvaluator).
        quality = CamEvaluator(classes, ignore_index=classes, layers=cfg.masks.layers)
        layers = run_eval(
            loader, lambda batch: {"masks": make_batch_masks(model, batch, cfg, device)}, {"quality": quality}
        )["quality"]
        report[split] = {}
        for layer, scores in layers.items():
            iou = scores["iou"]
            report[split][layer] = {**scores, "per_class": dict(zip(reader.classes, iou))}
            log.scalars(
                {"miou": scores["miou"], **{f"iou/{c}": v for c, v in zip(reader.classes, iou)}},
                step=0,
                prefix=f"pseudo_masks/{split}/{layer}/",
            )
            log.info(f"pseudo masks on {split}, layer {layer}: mIoU {scores['miou']:.4f}")
    if dist.is_main() and report:
        write_json(layout.masks_report_file(cfg.run_dir), {**report, "classifier": selection or {}})
    return report


@dataclass
class Prepared:
    """What the pass needs, checked before any mask is made."""

    reader: SplitReader
    model: torch.nn.Module
    device: torch.device
    selection: dict  # which stage-1 classifier (classifier.checkpoint, file, epoch, score)
    settings: dict  # mask_settings: what the manifest records


def prepare(cfg: Config) -> Prepared:
    """The train split, the classifier and the settings the masks depend on."""
    device = dist.device()
    gpu_options.apply(cfg.gpu, device)  # gpu.cudnn_benchmark: one patch size, autotuned once
    reader = open_split(cfg.data.root, "train")
    check_split(reader)
    model, model_path, selection = load_classifier(cfg, reader, device)
    settings = dist.on_rank0(lambda: mask_settings(cfg, reader, model_path, selection))
    return Prepared(reader, model, device, selection, settings)


def work(cfg: Config, log: RunLog, p: Prepared) -> None:
    """The missing chunks, then (when this run made any) the quality report and the
    complete manifest."""
    if run_pass(cfg, log, p.model, p.reader, p.device, p.settings):
        quality_report(cfg, log, p.model, p.device, p.selection)
        dist.on_rank0(lambda: finish_pass(cfg, log, p.reader.split))


SESSION = session.Stage(
    "masks", "Stage 2: multi-layer Grad-CAM pseudo masks", prepare=prepare, work=work, skip_bad_key="masks.skip_bad"
)


def _main(argv: list[str] | None = None) -> int:
    """The session without the exit-status mapping: errors propagate (for tests)."""
    return session.run(SESSION, argv)


def main(argv: list[str] | None = None) -> int:
    return session.main(SESSION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
