"""Inference on folders of images: any size (sliding window), colour modes, gate, bad files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import CLASSES, make_run

from mlps_dist.cli import infer as infer_cmd
from mlps_dist.deploy import infer
from mlps_dist.deploy.windows import window_starts
from mlps_dist.predict.predictor import Predictor, sliding_window


def test_window_starts_cover_every_pixel_and_stay_inside():
    for length, window, overlap in [(100, 32, 0.5), (33, 32, 0.0), (32, 32, 0.5), (20, 32, 0.5), (257, 64, 0.25)]:
        starts = window_starts(length, window, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s and s + min(window, length) <= length
            covered[s : s + window] = True
        assert covered.all()
        assert starts == sorted(set(starts))


def segment(model, classifier, rgb, window, overlap, image_size=0):
    predictor = Predictor(model, classifier, image_size=image_size, mean=[0.5] * 3, std=[0.25] * 3, gate_threshold=0.1)
    return sliding_window(predictor, rgb, window, overlap, batch_size=3).classes()[0].numpy()


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    """With a per-pixel model, averaging overlapping windows must reproduce the single pass
    exactly: any seam, gap or double count shows up as a difference."""
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1).eval()
    rgb = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    whole = segment(pointwise, None, rgb, window=512, overlap=0.5)
    windows = segment(pointwise, None, rgb, window=16, overlap=0.3)
    assert whole.shape == (45, 70)
    np.testing.assert_array_equal(windows, whole)


def test_windows_are_predicted_at_the_training_scale_like_evaluation():
    """A window of the stored patch size goes through the same resize as an evaluated patch:
    the sliding-window result of one patch equals the Predictor's direct output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Upsample(scale_factor=2)
    ).eval()
    rgb = np.random.default_rng(2).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    predictor = Predictor(model, None, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    direct = predictor(torch.from_numpy(rgb).permute(2, 0, 1)[None]).classes()[0].numpy()
    native = segment(model, None, rgb, window=48, overlap=0.5, image_size=0)
    assert (direct != native).any()  # the scale matters for this model, so the check means something
    np.testing.assert_array_equal(segment(model, None, rgb, window=48, overlap=0.5, image_size=32), direct)


def test_gate_with_sliding_windows_removes_classes_no_window_allows():
    class OnlyClass2Allowed(torch.nn.Module):
        def forward(self, x):  # classifier logits: class 2 certain, the rest ruled out
            return torch.tensor([-9.0, -9.0, 9.0, -9.0]).expand(x.shape[0], 4)

    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1).eval()
    rgb = np.random.default_rng(1).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    ungated = segment(pointwise, None, rgb, window=16, overlap=0.5)
    assert len(np.unique(ungated)) > 1  # otherwise the check below proves nothing
    assert (segment(pointwise, OnlyClass2Allowed(), rgb, window=16, overlap=0.5) == 2).all()


def test_cli_writes_masks_and_overlays_for_any_size_and_colour_mode(tmp_path):
    run = make_run(tmp_path / "run", image_size=32)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(inputs / "large.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(inputs / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(inputs / "grey.png")
    out = tmp_path / "out"
    assert infer_cmd.main(["--run", str(run), "--input", str(inputs), "--out", str(out), "--overlap", "0.25"]) == 0
    for rel, size in (("large", (90, 70)), ("sub/rgba", (32, 32)), ("grey", (24, 20))):
        mask = Image.open(out / f"{rel}.png")
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() < len(CLASSES)
        overlay = Image.open(out / f"{rel}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size
    assert not list(out.rglob("*.tmp"))


def test_rgba_is_composited_on_white_and_grey_becomes_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = infer.load_rgb(tmp_path / "a.png")
    assert rgb.shape == (4, 4, 3)
    assert (rgb[:2] == [200, 0, 0]).all() and (rgb[2:] == 255).all()
    Image.fromarray(np.full((3, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (infer.load_rgb(tmp_path / "g.png") == 77).all()


def test_unreadable_file_is_named_before_any_output(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
    (inputs / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert infer_cmd.main(["--run", str(run), "--input", str(inputs), "--out", str(out)]) == 2
    assert "broken.png: cannot be read as an image" in capsys.readouterr().err
    assert not out.exists() or not list(out.rglob("*.png"))


def test_missing_run_pieces_are_explained(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    args = ["--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    assert infer_cmd.main(["--run", str(tmp_path / "nothing"), *args]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    run = make_run(tmp_path / "run")
    (run / "classifier" / "model.pt").unlink()
    assert infer_cmd.main(["--run", str(run), *args]) == 2
    assert "run the classifier" in capsys.readouterr().err
    assert infer_cmd.main(["--run", str(run), *args, "--no-gate"]) == 0
    assert (tmp_path / "o" / "a.png").is_file()


@pytest.mark.slow
def test_two_ranks_split_the_files_and_write_each_once(tmp_path):
    import os
    import subprocess
    import sys

    run = make_run(tmp_path / "run")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(inputs / f"p{i}.png")
    single = tmp_path / "single"
    assert infer_cmd.main(["--run", str(run), "--input", str(inputs), "--out", str(single)]) == 0
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mlps_dist",
            "--",
            "infer",
            "--run",
            str(run),
            "--input",
            str(inputs),
            "--out",
            str(tmp_path / "two"),
        ],
        check=True,
        cwd=repo,
        env=env,
        timeout=120,
        capture_output=True,
    )
    for i in range(5):
        for name in (f"p{i}.png", f"p{i}_overlay.png"):
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / "two" / name)), np.asarray(Image.open(single / name))
            ), name


def test_contact_sheet_has_a_row_per_sample_and_a_column_per_view(tmp_path, tiny_shards):
    from tool_runs import run_tool

    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    out = tmp_path / "sheet.png"
    proc = run_tool("-m", "mlps_dist", "visualize", "--run", str(run), "--split", "val", "--n", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "image, ground truth, prediction (gated)" in proc.stdout
    sheet = np.asarray(Image.open(out).convert("RGB"))
    # 48 px patches are enlarged 4x to 192 px: 3 panels wide (+ key column), 3 rows high
    assert sheet.shape[1] == 110 + 3 * (192 + 4)
    assert sheet.shape[0] > 3 * 192
