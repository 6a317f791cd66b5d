"""Contact sheet of a run (``mlps visualize``): per sample the image, its ground truth, its
pseudo masks and the segmenter's prediction, side by side, with a colour legend.

Columns: image | stain-normalised image (runs with data.stain: what the networks see) | ground
truth (val/test) | pseudo mask per layer (train, from RUN/pseudo_masks/train) | with --cams,
the stage-1 classifier's Grad-CAM per masks.layers, argmax over the patch's labelled classes,
computed as the mask pass does (any split, so CAMs on held-out tissue can be looked at) |
prediction (when RUN/segmenter has a model; gated with the stage-1 classifier unless --no-gate
or it is missing). White in a mask = ignore / background. Samples are spread evenly over the
split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mlps_dist.config import ConfigError, load_config
from mlps_dist.core import layout
from mlps_dist.core.draw import blend, palette_for
from mlps_dist.core.fileio import atomic_open
from mlps_dist.data.decode import decode_sample
from mlps_dist.data.shards import open_split
from mlps_dist.data.stain_run import split_stain
from mlps_dist.predict.predictor import create_predictor

LABEL_H = 18
MIN_SIDE = 160  # small patches are enlarged (nearest neighbour) so the sheet stays legible


def build_predictor(run: Path, cfg, num_classes: int, checkpoint: str, gate: bool):
    """The run's predictor (mlps_dist.predict.predictor), or None while stage 3 has no model yet."""
    if not layout.model_file(run, "segmenter").is_file():
        return None, ""
    gate = gate and layout.model_file(run, "classifier").is_file()
    predictor, _ = create_predictor(run, cfg, checkpoint=checkpoint, gate=gate, num_classes=num_classes)
    return predictor, "prediction (gated)" if gate else "prediction"


def cam_panels(cams, cfg, rgb: np.ndarray, labels: np.ndarray, palette) -> list[np.ndarray]:
    """The mask pass's label maps for one patch (``rgb`` already stain-normalised)."""
    from mlps_dist.method import cam

    model, device = cams
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    from mlps_dist.data.augment import model_input

    images = model_input((batch.float() / 255 - mean) / std, cfg.data.image_size).to(device)
    masks = cam.make_masks_cfg(
        model, {"image": images, "labels": torch.from_numpy(labels)[None], "rgb": batch}, cfg.masks
    )
    return [blend(rgb, masks[layer][0].cpu().numpy(), palette, alpha=0.6) for layer in cfg.masks.layers]


def sample_panels(reader, i: int, store, predictor, palette, stain=None, cams=None, cfg=None) -> list[np.ndarray]:
    sample = decode_sample(reader.read(i))
    rgb = sample["rgb"]
    panels = [rgb]
    seen = rgb if stain is None else stain(rgb)
    if stain is not None:
        panels.append(seen)
    if reader.has_masks:
        panels.append(blend(rgb, sample["mask"], palette, alpha=0.6))
    if store is not None:
        panels += [blend(rgb, mask, palette, alpha=0.6) for mask in store.read_masks(i)]
    if cams is not None:
        panels += cam_panels(cams, cfg, seen, sample["labels"], palette)
    if predictor is not None:
        pred = predictor(torch.from_numpy(rgb).permute(2, 0, 1)[None]).classes()[0].numpy()
        panels.append(blend(rgb, pred, palette, alpha=0.6))
    return panels


def draw_sheet(rows: list[tuple[str, list[np.ndarray]]], titles: list[str], classes: list[str], palette) -> Image.Image:
    h, w = rows[0][1][0].shape[:2]
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    ph, pw, gap = h * scale, w * scale, 4
    key_w = 110
    width = key_w + len(titles) * (pw + gap)
    legend_h = LABEL_H + 6
    sheet = Image.new("RGB", (width, LABEL_H + len(rows) * (ph + gap) + legend_h), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, title in enumerate(titles):
        pen.text((key_w + c * (pw + gap) + 2, 3), title, fill=(0, 0, 0), font=font)
    for r, (key, panels) in enumerate(rows):
        top = LABEL_H + r * (ph + gap)
        pen.text((4, top + ph // 2 - 6), key, fill=(0, 0, 0), font=font)
        for c, panel in enumerate(panels):
            tile = Image.fromarray(panel).resize((pw, ph), Image.NEAREST)
            sheet.paste(tile, (key_w + c * (pw + gap), top))
    x, y = 4, LABEL_H + len(rows) * (ph + gap) + 3
    for name, colour in zip(classes + ["ignore"], palette):
        pen.rectangle([x, y, x + 12, y + 12], fill=tuple(colour), outline=(0, 0, 0))
        pen.text((x + 16, y), name, fill=(0, 0, 0), font=font)
        x += 24 + 7 * len(name)
    return sheet


def contact_sheet(
    run_dir: str | Path,
    out: str | Path,
    split: str = "val",
    count: int = 8,
    checkpoint: str = "best",
    gate: bool = True,
    cams_wanted: bool = False,
) -> str:
    """Write the contact sheet of ``count`` samples of ``split`` to the image file ``out``;
    returns the line that says what was written."""
    run = Path(run_dir)
    if not layout.config_file(run).is_file():  # any run from stage 1 on (not only a finished one)
        raise ConfigError(f"{layout.config_file(run)} does not exist; --run must be a run directory")
    cfg = load_config(layout.config_file(run))
    reader = open_split(cfg.data.root, split)
    palette = palette_for(reader.num_classes, reader.info)
    store = None
    if split == "train" and layout.masks_manifest(run).is_file():
        from mlps_dist.data.pseudo_masks import PseudoMaskStore

        store = PseudoMaskStore(layout.masks_dir(run))
    predictor, pred_title = build_predictor(run, cfg, reader.num_classes, checkpoint, gate)
    stain = split_stain(cfg, reader, run)  # as the split's loader applies it
    cams = None
    if cams_wanted:
        from mlps_dist.method import cam
        from mlps_dist.predict.gate import load_classifier

        model, _ = load_classifier(run, reader.num_classes)
        cam.prepare_model(model)
        cams = (model, torch.device("cpu"))
    titles = ["image"] + (["stain-normalised"] if stain is not None else [])
    titles += ["ground truth"] if reader.has_masks else []
    titles += [f"pseudo {layer}" for layer in store.layers] if store is not None else []
    titles += [f"CAM {layer}" for layer in cfg.masks.layers] if cams is not None else []
    titles += [pred_title] if predictor is not None else []
    picks = sorted({int(round(v)) for v in np.linspace(0, len(reader) - 1, min(count, len(reader)))})
    rows = [(reader.key(i), sample_panels(reader, i, store, predictor, palette, stain, cams, cfg)) for i in picks]
    out = Path(out)
    with atomic_open(out) as f:
        draw_sheet(rows, titles, list(reader.classes), palette).save(
            f, format=(out.suffix[1:] or "png").upper().replace("JPG", "JPEG")
        )
    return f"wrote {out} ({len(rows)} samples: {', '.join(titles)})"
