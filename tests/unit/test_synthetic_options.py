"""Synthetic generator options and variants: each option moves the data the intended way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlps_dist.method.cam import component_sizes, white_background
from mlps_dist.synthetic import patches
from mlps_dist.synthetic.options import (
    HELD_OUT_VARIANTS,
    TUNING_VARIANTS,
    VARIANTS,
    SyntheticOptionError,
    SynthOptions,
    variant_options,
    variant_white_is_white,
)
from mlps_dist.synthetic.patches import WHITE, labels_of, make_sample, write_luad_layout
from mlps_dist.synthetic.tissue import nuclei

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(options: SynthOptions, count: int, split: str = "val", size: int | None = None):
    return [make_sample(0, split, i, size, options)[1:] for i in range(count)]


def _hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution onto the reference hematoxylin vector (per pixel)."""
    od = -np.log(np.clip(rgb.astype(np.float64), 1, 255) / 255.0)
    h, e = np.array(patches.SynthOptions().stain_vectors())
    return od @ np.linalg.pinv(np.stack([h, e]))[:, 0]


def test_darker_hematoxylin_darkens_the_nuclear_channel():
    base, dark = variant_options("default", size=64), variant_options("default", size=64, h_strength=1.8)
    for (rgb0, mask0), (rgb1, mask1) in zip(_samples(base, 8), _samples(dark, 8)):
        assert np.array_equal(mask0, mask1), "stain options must not move the tissue layout"
        tissue = mask0 != WHITE
        if not tissue.any():
            continue
        # Red is the channel hematoxylin absorbs most and eosin least.
        assert rgb1[..., 0][tissue].mean() < rgb0[..., 0][tissue].mean() - 5
        assert _hematoxylin_od(rgb1)[tissue].mean() > 1.3 * _hematoxylin_od(rgb0)[tissue].mean()


def test_eosin_strength_and_hue_change_colour():
    base = _samples(variant_options("default", size=64), 6)
    pink = _samples(variant_options("default", size=64, e_strength=1.8), 6)
    turned = _samples(variant_options("default", size=64, hue_shift=25.0), 6)
    green = np.mean([rgb[..., 1].mean() for rgb, _ in base])
    assert np.mean([rgb[..., 1].mean() for rgb, _ in pink]) < green - 5, "eosin absorbs green"
    ratio = lambda samples: np.mean([rgb[..., 0].mean() / (rgb[..., 2].mean() + 1) for rgb, _ in samples])  # noqa: E731
    assert abs(ratio(turned) - ratio(base)) > 0.03


def test_brightness_white_balance_and_gamma():
    def grey(options):
        return np.mean([rgb.astype(float).mean() for rgb, _ in _samples(options, 6)])

    base = variant_options("default", size=64)
    assert grey(variant_options("default", size=64, brightness=1.1)) > grey(base) + 5
    assert grey(variant_options("default", size=64, brightness=0.85)) < grey(base) - 10
    assert grey(variant_options("default", size=64, gamma=1.4)) > grey(base) + 5
    warm = _samples(variant_options("default", size=64, white_balance=(1.0, 1.0, 0.8)), 6)
    cool = _samples(variant_options("default", size=64), 6)
    assert np.mean([r[..., 2].mean() for r, _ in warm]) < np.mean([r[..., 2].mean() for r, _ in cool]) - 10


def test_patch_size_from_variant_and_flag():
    _, rgb, mask = make_sample(0, "train", 0, options=variant_options("large-patches"))
    assert rgb.shape == (224, 224, 3) and mask.shape == (224, 224)
    _, rgb, _ = make_sample(0, "train", 0, options=variant_options("large-patches", size=48))
    assert rgb.shape == (48, 48, 3)
    assert variant_options("default").size == 96


def _nuclei_components(scale: float, density: float) -> tuple[float, int]:
    """(median size, count) of sparse nuclei (hematoxylin > 0.5), as in stroma."""
    sizes, count = [], 0
    for seed in range(3):
        h = nuclei(
            np.random.default_rng(seed),
            128,
            cell=12,
            fill=0.3,
            radius=(3.0, 4.0),
            elongation=(1.0, 1.2),
            darkness=(1.0, 1.2),
            scale=scale,
            density=density,
        )
        region = torch.from_numpy(h > 0.5)[None]
        comp = component_sizes(region)[0].numpy()
        found = comp[comp > 0]
        sizes.extend(found.tolist())
        count += int((1.0 / found).sum().round())  # each component counted once
    return float(np.median(sizes)), count


def test_nuclear_size_and_density():
    size1, count1 = _nuclei_components(1.0, 1.0)
    size_big, count_big = _nuclei_components(1.5, 1.0)
    size_dense, count_dense = _nuclei_components(1.0, 0.5)
    assert size_big > 1.6 * size1, (size1, size_big)
    assert count_big < count1 and count_dense < 0.75 * count1, (count1, count_big, count_dense)


def test_texture_scale_makes_texture_finer_or_coarser():
    def correlation_at_4px(scale):
        """Autocorrelation of the grey image 4 px apart: higher = coarser texture."""
        values = []
        for rgb, _ in _samples(variant_options("default", size=64, texture_scale=scale), 6):
            g = rgb.astype(float).mean(axis=2)
            g -= g.mean()
            values.append(((g[:, 4:] * g[:, :-4]).mean() + (g[4:] * g[:-4]).mean()) / 2 / (g * g).mean())
        return np.mean(values)

    fine, base, coarse = correlation_at_4px(0.6), correlation_at_4px(1.0), correlation_at_4px(1.8)
    assert fine < base - 0.03 and coarse > base + 0.08, (fine, base, coarse)


def test_class_mix_respected_statistically():
    options = variant_options(
        "default", size=40, class_weights=(0.5, 0.0, 0.5, 0.0), tissues_per_patch=(0.6, 0.4, 0.0, 0.0), white_prob=0.0
    )
    labels = np.array([labels_of(mask) for _, mask in _samples(options, 200, "train")])
    assert labels[:, [1, 3]].sum() == 0, "classes with weight 0 never appear"
    counts = labels.sum(1)
    assert counts.max() <= 2 and counts.min() >= 1
    # Each of the two classes is in a patch with P = 0.6 * 0.5 + 0.4 * 1 = 0.7 (less when
    # absorbed); 200 patches: a binomial standard deviation of 0.03.
    assert np.all(np.abs(labels[:, [0, 2]].mean(0) - 0.7) < 0.12), labels.mean(0)
    assert abs((counts == 1).mean() - 0.6) < 0.12
    with_glass = variant_options("default", size=40, white_prob=0.8)
    share = np.mean([(mask == WHITE).any() for _, mask in _samples(with_glass, 150, "train")])
    assert abs(share - 0.8) < 0.1


def test_same_seed_same_bytes_per_variant(tmp_path):
    options = variant_options("fine-texture", size=48)
    write_luad_layout(tmp_path / "a", train=4, val=2, test=2, seed=5, options=options)
    write_luad_layout(tmp_path / "b", train=4, val=2, test=2, seed=5, options=options)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 4 + 2 * 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    stem, other, _ = make_sample(5, "val", 0, options=variant_options("pale", size=48))
    assert not np.array_equal(other, np.asarray(Image.open(tmp_path / "a" / "val" / "img" / f"{stem}.png")))
    with pytest.raises(ValueError, match="h_strength"):  # another variant is not mixed into the folder
        write_luad_layout(tmp_path / "a", train=4, val=2, test=2, seed=5, options=variant_options("pale", size=48))


def test_unknown_variant_and_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(SyntheticOptionError, match="valid variants: default, pale"):
        variant_options("blurry")
    with pytest.raises(SyntheticOptionError, match="brightness=3.0"):
        variant_options("default", brightness=3.0)
    with pytest.raises(SyntheticOptionError, match="tissues_per_patch"):
        variant_options("default", class_weights=(1, 0, 0, 0), tissues_per_patch=(0.5, 0.5, 0, 0))
    from mlps_dist.cli import synthetic as tool

    assert tool.main(["--out", str(tmp_path / "x"), "--variant", "blurry"]) == 2
    err = capsys.readouterr().err
    assert "blurry" in err and all(name in err for name in VARIANTS)
    assert not (tmp_path / "x").exists(), "nothing is written for a bad variant"


def test_cli_variant_with_override(tmp_path):
    from mlps_dist.cli import synthetic as tool

    out = tmp_path / "v"
    assert (
        tool.main(
            [
                "--out",
                str(out),
                "--variant",
                "large-nuclei",
                "--size",
                "40",
                "--nuclear-size",
                "1.2",
                "--train",
                "2",
                "--val",
                "1",
                "--test",
                "1",
            ]
        )
        == 0
    )
    import json

    params = json.loads((out / "synthetic.json").read_text())["params"]
    assert params["size"] == 40 and params["options"]["nuclear_size"] == 1.2
    assert params["options"]["nuclear_density"] == VARIANTS["large-nuclei"]["nuclear_density"]


def test_white_glass_is_white_and_ignored_in_eval_masks(tmp_path):
    """Glass is mask index 4 in val/test and grey > 200 there; tissue stays darker, so the
    pipeline's white channel (grey > 200, components >= 50 px) finds glass, not tissue."""
    options = variant_options("default", size=80)
    write_luad_layout(tmp_path, train=0, val=12, test=12, seed=1, options=options)
    images, masks = [], []
    for split in ("val", "test"):
        for path in sorted((tmp_path / split / "mask").iterdir()):
            masks.append(np.asarray(Image.open(path)))
            images.append(np.asarray(Image.open(tmp_path / split / "img" / path.name).convert("RGB")))
    masks, images = np.stack(masks), np.stack(images)
    glass = masks == WHITE
    assert glass.any(), "some patches show glass"
    grey = images.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (grey[glass] > 200).mean() > 0.95
    found = white_background(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert (found & ~glass).sum() < 0.06 * (~glass).sum(), "tissue is taken for glass"
    assert (found & glass).sum() > 0.85 * glass.sum(), "glass is missed"


def test_variant_split_defined_once_and_harness_reads_it():
    assert set(TUNING_VARIANTS).isdisjoint(HELD_OUT_VARIANTS)
    assert set(TUNING_VARIANTS) | set(HELD_OUT_VARIANTS) == set(VARIANTS)
    assert 6 <= len(VARIANTS) <= 8
    harness = _load_tool("demo_variants")
    assert harness.parse_args(["--held-out"]).names == list(HELD_OUT_VARIANTS)
    assert harness.parse_args(["--tuning", "a.b=1"]).overrides == ["a.b=1"]
    with pytest.raises(SystemExit):
        harness.parse_args(["--variants", "default,blurry"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_white_is_white_flag_matches_the_data(variant):
    """variant_white_is_white (the harness's white-channel switch) agrees with the images:
    where it says yes, grey > 200 finds glass and little tissue; where no, much tissue."""
    options = variant_options(variant, size=64)
    samples = _samples(options, 12)
    masks = np.stack([m for _, m in samples])
    images = torch.from_numpy(np.stack([r for r, _ in samples])).permute(0, 3, 1, 2)
    found = white_background(images).numpy()
    tissue_taken = (found & (masks != WHITE)).sum() / (masks != WHITE).sum()
    assert (found & (masks == WHITE)).sum() > 0.85 * (masks == WHITE).sum()
    if variant_white_is_white(variant):
        assert tissue_taken < 0.07, tissue_taken
    else:
        assert tissue_taken > 0.15, tissue_taken
    # Asking white to be near grey as well (the demo's masks.background.max_saturation) finds
    # most of the glass of every variant and leaves its tissue alone.
    limited = white_background(images, max_saturation=20).numpy()
    assert (limited & (masks == WHITE)).sum() > 0.7 * (masks == WHITE).sum()  # noisy glass pixels are missed
    assert (limited & (masks != WHITE)).sum() < 0.01 * (masks != WHITE).sum()


def test_harness_turns_the_white_channel_on_everywhere_when_the_config_limits_saturation():
    harness = _load_tool("demo_variants")
    demo, luad = (
        harness.saturation_limited("configs/demo.yaml", []),
        harness.saturation_limited("configs/luad.yaml", []),
    )
    assert harness.background_enabled("pale", "auto", demo) is True
    assert harness.background_enabled("pale", "auto", luad) is False
    assert harness.background_enabled("default", "auto", luad) is True
    assert harness.background_enabled("default", "off", demo) is False
    assert harness.background_enabled("pale", "config", demo) is None
    # an override counts as the config does
    assert not harness.saturation_limited("configs/demo.yaml", ["masks.background.max_saturation=0"])


def test_harness_restarts_a_stage_only_in_run_directories_that_hold_a_run(tmp_path):
    harness = _load_tool("demo_variants")
    args = harness.parse_args(["--variants", "pale", "--restart-from", "segmenter", "segmenter.epochs=2"])
    args.limited = True
    data, run = tmp_path / "data", tmp_path / "run"
    fresh = harness.pipeline_command(args, "pale", data, run)
    assert fresh[:3] == ["bash", "launch/pipeline.sh", args.config] and "--restart-from" not in fresh
    assert fresh[-3:] == [f"data.root={data / 'shards'}", "masks.background.enabled=true", "segmenter.epochs=2"]
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    assert harness.pipeline_command(args, "pale", data, run)[2:4] == ["--restart-from", "segmenter"]


def test_harness_reads_stage1_scores_and_flags_a_collapse():
    harness = _load_tool("demo_variants")
    events = [
        {"stage": "classifier", "kind": "scalars", "step": s, "val/score": v}
        for s, v in ((10, 0.5), (20, 0.6), (30, 0.62), (30, 0.62), (40, 0.3), (50, 0.55))
    ]
    events.append({"stage": "segmenter", "kind": "scalars", "step": 10, "val/score": 0.9})
    scores = harness.stage1_val_scores(events)
    assert scores == [0.5, 0.6, 0.62, 0.3, 0.55], "one score per epoch, classifier only"
    assert harness.pda_collapse(scores, 3)["stage1_collapsed"] is True
    assert harness.pda_collapse([0.5, 0.6, 0.62, 0.58, 0.65], 3)["stage1_collapsed"] is False
    row = {
        "variant": "pale",
        "role": "tuning",
        "seed": 0,
        "background": False,
        "test_miou_gated": 0.8123,
        "stage1_min_after_pda": 0.3,
        "stage1_collapsed": True,
        "pseudo_mask_miou": {"bn7": 0.7},
        "wall_s": 600,
    }
    table = harness.markdown_table([row])
    assert "| pale | tuning | 0 | off | 81.2 |" in table and "30.0 (collapsed)" in table and "| 10.0 |" in table


def test_harness_reuses_a_row_only_for_the_same_config_and_overrides(tmp_path):
    harness = _load_tool("demo_variants")
    config = tmp_path / "demo.yaml"
    config.write_text("segmenter:\n  epochs: 3\n")
    args = harness.parse_args(["--variants", "pale", "--config", str(config), "a.b=1"])
    row = {"variant": "pale", "seed": 0, **harness.settings(args)}
    assert harness.reusable(row, harness.settings(args))
    assert not harness.reusable(row, harness.settings(harness.parse_args(["--config", str(config), "a.b=2"])))
    config.write_text("segmenter:\n  epochs: 4\n")  # the same file, edited since
    assert not harness.reusable(row, harness.settings(args))
    assert not harness.reusable(
        {"variant": "pale", "seed": 0, "config": str(config), "overrides": ["a.b=1"]}, harness.settings(args)
    )  # a row from before digests were kept


def test_harness_collects_pseudo_masks_past_the_classifier_record(tmp_path):
    """metrics/pseudo_masks.json starts with the classifier that made the masks; the harness
    reports the split's layers, not that record."""
    import json

    harness = _load_tool("demo_variants")
    run, data = tmp_path / "run", tmp_path / "data"
    (run / "metrics").mkdir(parents=True)
    (data / "raw").mkdir(parents=True)
    (run / "metrics" / "test.json").write_text(json.dumps({"miou": 0.8, "ungated": {"miou": 0.79}, "iou": {}}))
    (run / "metrics" / "pseudo_masks.json").write_text(
        json.dumps(
            {"classifier": {"checkpoint": "best", "epoch": 3}, "val": {"b5_2": {"miou": 0.7}, "bn7": {"miou": 0.72}}}
        )
    )
    (run / "log.jsonl").write_text(json.dumps({"time": 1.0, "stage": "classifier", "step": 5, "val/score": 0.6}))
    (data / "raw" / "synthetic.json").write_text(json.dumps({"summary": {"seconds": 12.5}}))
    row = harness.collect(run, data)
    assert row["pseudo_mask_miou"] == {"b5_2": 0.7, "bn7": 0.72}
    assert row["test_miou_gated"] == 0.8 and row["stage1_best_val"] == 0.6 and row["data_wall_s"] == 12.5


def test_contact_sheet(tmp_path):
    sheet_tool = _load_tool("synthetic_sheet")
    out = tmp_path / "sheet.png"
    assert (
        sheet_tool.main(["--out", str(out), "--variants", "pale,sparse-classes", "--per-row", "2", "--tile", "32"]) == 0
    )
    image = Image.open(out)
    assert image.size == (sheet_tool.LABEL_WIDTH + 2 * 2 * (32 + sheet_tool.GAP), 2 * (32 + sheet_tool.GAP))
    assert sheet_tool.main(["--out", str(tmp_path / "x.png"), "--variants", "nope"]) == 2
