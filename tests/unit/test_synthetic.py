"""Synthetic H&E generator: LUAD-HistoSeg layout, determinism, masks, labels, realism."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from mlps_dist.synthetic import patches
from mlps_dist.synthetic.patches import CLASSES, MIN_TISSUE_FRACTION, WHITE, make_patch, write_luad_layout

TRAIN_NAME = re.compile(r"^synth\d{2}-\d+-\d+-\[([01]) ([01]) ([01]) ([01])\]\.png$")
EVAL_NAME = re.compile(r"^synth\d{2}-\d+-\d+\.png$")
LUAD_PALETTE = [205, 51, 51, 0, 255, 0, 65, 105, 225, 255, 165, 0, 255, 255, 255]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("luad")
    summary = write_luad_layout(out, train=24, val=6, test=6, size=64, seed=3)
    return out, summary


def test_layout_and_names(layout):
    out, summary = layout
    train = sorted(p.name for p in (out / "train").iterdir())
    assert len(train) == 24 and summary["counts"] == {"train": 24, "val": 6, "test": 6}
    for name in train:
        match = TRAIN_NAME.match(name)
        assert match, name
        assert sum(int(v) for v in match.groups()) >= 1, f"{name}: a train patch has at least one tissue"
    for split in ("val", "test"):
        images = sorted(p.name for p in (out / split / "img").iterdir())
        masks = sorted(p.name for p in (out / split / "mask").iterdir())
        assert images == masks and len(images) == 6
        assert all(EVAL_NAME.match(n) for n in images), images
    stems = [n.rsplit("-[", 1)[0] for n in train] + [p.stem for p in out.glob("*/img/*.png")]
    assert len(set(stems)) == len(stems), "names are unique across splits"
    assert not list(out.rglob("*.tmp"))


def test_masks_are_palettised_luad(layout):
    out, _ = layout
    for path in sorted(out.glob("*/mask/*.png")):
        mask = Image.open(path)
        assert mask.mode == "P" and mask.size == (64, 64)
        assert mask.getpalette()[:15] == LUAD_PALETTE
        values = np.unique(np.asarray(mask))
        assert values.min() >= 0 and values.max() <= WHITE
        image = Image.open(path.parent.parent / "img" / path.name)
        assert image.mode == "RGB" and image.size == (64, 64)


def test_same_seed_same_bytes_and_patch_independent_of_count(layout, tmp_path):
    out, _ = layout
    write_luad_layout(tmp_path / "a", train=10, val=2, test=3, size=64, seed=3)
    for path in sorted((tmp_path / "a").rglob("*.png")):
        twin = out / path.relative_to(tmp_path / "a")
        assert twin.exists(), f"{twin} missing: patch i must not depend on the patch count"
        assert twin.read_bytes() == path.read_bytes()
    write_luad_layout(tmp_path / "b", train=10, val=0, test=0, size=64, seed=4)
    assert sorted(p.name for p in (tmp_path / "b" / "train").iterdir()) != sorted(
        p.name for p in (tmp_path / "a" / "train").iterdir()
    )


def test_labels_match_mask_and_tissue_count():
    counts, whites = [], 0
    for index in range(40):
        stem, rgb, mask = patches.make_sample(0, "train", index, 64)
        area = np.bincount(mask.ravel(), minlength=WHITE + 1)
        labels = patches.labels_of(mask)
        tissues = [c for c in range(len(CLASSES)) if area[c] > 0]
        assert labels == [int(c in tissues) for c in range(len(CLASSES))]
        assert all(area[c] >= MIN_TISSUE_FRACTION * mask.size for c in tissues), area
        counts.append(len(tissues))
        whites += area[WHITE] > 0
        # White regions are near-white pixels; tissue is not.
        if area[WHITE] > 0:
            grey = rgb.mean(axis=2)
            assert np.median(grey[mask == WHITE]) > max(200, np.median(grey[mask != WHITE]) + 10)
    assert set(counts) <= {1, 2, 3, 4} and len(set(counts)) >= 3
    assert 0 < whites < 40


def test_make_patch_contract():
    rng = np.random.default_rng(0)
    rgb, mask = make_patch(rng, 96)
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    assert rgb.std() > 5, "textured, not flat"


def test_refuses_foreign_folder_and_other_parameters(tmp_path, layout):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_luad_layout(tmp_path, train=2, val=1, test=1, size=64)
    out, _ = layout
    with pytest.raises(ValueError, match="seed"):
        write_luad_layout(out, train=24, val=6, test=6, size=64, seed=4)
    with pytest.raises(ValueError, match="train=-1"):
        write_luad_layout(tmp_path / "new", train=-1, val=1, test=1)


def test_rerun_after_interruption_completes_identically(tmp_path, layout):
    """In worker processes too: the same files, and the same summary, as one process drawing all."""
    out, summary = layout
    target = tmp_path / "resume"
    write_luad_layout(target, train=24, val=6, test=6, size=64, seed=3, workers=2)
    # Simulate a crash: some files never written, one temp file left behind.
    victims = sorted(target.rglob("*.png"))[::3]
    for path in victims:
        path.unlink()
    (target / "train" / "junk.png.tmp").write_bytes(b"partial")
    again = write_luad_layout(target, train=24, val=6, test=6, size=64, seed=3, workers=2)
    assert again["generated"] == len({(p.relative_to(target).parts[0], p.name) for p in victims})  # img+mask: one patch
    for path in sorted(out.rglob("*.png")):
        assert (target / path.relative_to(out)).read_bytes() == path.read_bytes()
    assert sorted(p.relative_to(target) for p in target.rglob("*.png")) == sorted(
        p.relative_to(out) for p in out.rglob("*.png")
    )
    for key in ("train_label_frequency", "pixel_frequency"):
        assert again[key] == summary[key], key


def test_cli_in_process(tmp_path, capsys):
    from mlps_dist.cli.synthetic import main

    assert main(["--out", str(tmp_path / "cli"), "--train", "3", "--val", "1", "--test", "1", "--size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "patches/s" in printed and "generated 5" in printed and "train label frequency" in printed
    assert len(list((tmp_path / "cli" / "train").iterdir())) == 3
    assert main(["--out", str(tmp_path / "cli"), "--train", "4"]) == 2


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean filter through an integral image."""
    padded = np.pad(image, radius, mode="edge")
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * radius + 1
    return (integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]) / (k * k)


def _texture_features(rgb: np.ndarray) -> list[float]:
    """Brightness-normalised texture statistics: nuclear darkness, local contrast, fibre coherence."""
    grey = rgb.astype(np.float64).mean(axis=2)
    grey = grey / (np.percentile(grey, 98) + 1.0)
    smooth = _box(grey, 1)
    gy, gx = np.gradient(smooth)
    jxx, jyy, jxy = _box(gx * gx, 4), _box(gy * gy, 4), _box(gx * gy, 4)
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-6)
    dark = (grey < 0.6).astype(np.float64)
    return [
        dark.mean(),
        (grey < 0.45).mean(),
        (grey > 0.9).mean(),
        np.abs(grey - smooth).mean(),
        np.abs(smooth - _box(grey, 4)).mean(),
        coherence.mean(),
        (coherence > 0.6).mean(),
        (grey < _box(grey, 2) - 0.08).mean(),
        _box(dark, 3).std(),
    ]


def _cross_validated_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5) -> np.ndarray:
    """Per-class accuracy of least-squares linear classifiers, 5-fold cross-validated."""
    correct = np.zeros(labels.shape[1])
    for fold in range(folds):
        held = np.arange(len(features)) % folds == fold
        mean, std = features[~held].mean(0), features[~held].std(0) + 1e-9
        design = np.c_[(features - mean) / std, np.ones(len(features))]
        weights, *_ = np.linalg.lstsq(design[~held], labels[~held], rcond=None)
        correct += ((design[held] @ weights > 0.5) == (labels[held] > 0.5)).sum(0)
    return correct / len(features)


def test_presence_not_readable_from_mean_colour():
    """Stain and brightness vary enough that mean RGB predicts tissue presence clearly worse than texture."""
    mean_rgb, texture, labels = [], [], []
    for index in range(200):
        _, rgb, mask = patches.make_sample(0, "train", index, 128)
        mean_rgb.append(rgb.reshape(-1, 3).mean(0) / 255.0)
        texture.append(_texture_features(rgb))
        labels.append(patches.labels_of(mask))
    labels = np.array(labels, np.float64)
    colour_acc = _cross_validated_accuracy(np.array(mean_rgb), labels)
    texture_acc = _cross_validated_accuracy(np.array(texture), labels)
    assert (texture_acc > colour_acc).all(), (colour_acc, texture_acc)
    assert texture_acc.mean() - colour_acc.mean() >= 0.07, (colour_acc, texture_acc)
    assert texture_acc.mean() >= 0.72, "the texture baseline itself must work for the comparison to mean anything"
