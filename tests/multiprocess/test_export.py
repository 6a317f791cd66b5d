"""ONNX export: the graph equals the torch prediction path (resize, gate, fallback), the CLI
self-checks and writes model.json + card, infer --model agrees with infer --run, bad inputs."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from trained_runs import CLASSES, make_run

from mlps_dist.cli import export as export_cmd
from mlps_dist.cli import infer
from mlps_dist.core.errors import InputError
from mlps_dist.core.fileio import sha256_file
from mlps_dist.deploy.onnx_model import OnnxModel
from mlps_dist.predict import export
from mlps_dist.predict.export_graph import DeployGraph, antialiased_resize
from mlps_dist.predict.predictor import Predictor, create_predictor


@pytest.mark.parametrize("h,w,size", [(48, 48, 32), (224, 224, 224), (50, 37, 32), (20, 24, 32), (300, 97, 64)])
def test_exportable_resize_equals_torch_antialiased_bilinear(h, w, size):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    want = (
        x
        if (h, w) == (size, size)
        else F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    )
    torch.testing.assert_close(antialiased_resize(x, size), want, rtol=0, atol=1e-5)


class BrightnessGate(torch.nn.Module):
    """Classifier logits chosen by the patch's brightness: bright patches allow classes 1 and 3,
    dark patches allow none (the all-gated-off fallback)."""

    def forward(self, x):
        partial = torch.tensor([-9.0, 9.0, -9.0, 9.0])
        nothing = torch.full((4,), -9.0)
        return torch.where(x.mean(dim=(1, 2, 3))[:, None] > 0, partial, nothing)


def test_graph_reproduces_predictor_gate_and_fallback_for_any_n_h_w(tmp_path):
    torch.manual_seed(0)
    segmenter = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Upsample(scale_factor=2, mode="bilinear")
    )
    predictor = Predictor(
        segmenter, BrightnessGate(), image_size=32, mean=[0.5] * 3, std=[0.25] * 3, gate_threshold=0.1
    )
    path = tmp_path / "g.onnx"
    export.export_graph(DeployGraph.from_predictor(predictor), path, opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n, h, w in [(2, 48, 48), (2, 32, 32), (3, 50, 37), (2, 20, 24)]:  # first bright, last dark
        tiles = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
        tiles[0] = np.clip(tiles[0].astype(int) + 120, 0, 255)  # bright: classes 1, 3 only
        tiles[-1] //= 3  # dark: everything gated off -> ungated prediction
        classes, scores, presence = session.run(None, {"image": tiles})
        want = predictor(torch.from_numpy(tiles))
        assert classes.shape == (n, h, w) and scores.shape == (n, 4, h, w) and presence.shape == (n, 4)
        np.testing.assert_array_equal(classes, want.classes().numpy())
        np.testing.assert_allclose(scores, want.scores().numpy(), atol=1e-5)
        np.testing.assert_allclose(presence, want.probs.numpy(), atol=1e-6)
        assert set(np.unique(classes[0])) <= {1, 3} and (scores[0][[0, 2]] == 0).all()  # -inf -> exactly 0
        assert len(np.unique(classes[-1])) > 2  # fallback: ungated argmax, not all class 0
        np.testing.assert_array_equal(classes[-1], want.classes(gated=False)[-1].numpy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_shards):
    """A tiny run on the tiny shards, with test metrics and the score refinement on (a few
    iterations), exported by the CLI: every deploy path below runs the refinement."""
    base = tmp_path_factory.mktemp("export")
    run = make_run(base / "run", data_root=str(tiny_shards), image_size=32)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["evaluate"]["refine"] = {**cfg["evaluate"]["refine"], "enabled": True, "iterations": 3}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "metrics").mkdir()
    iou = {c: 0.5 + 0.1 * i for i, c in enumerate(CLASSES)}
    (run / "metrics" / "test.json").write_text(
        json.dumps(
            {
                "miou": 0.6512,
                "fwiou": 0.7,
                "acc": 0.8,
                "macc": 0.75,
                "iou": iou,
                "gate": True,
                "samples": 8,
                "ungated": {"miou": 0.6, "fwiou": 0.65, "acc": 0.7, "macc": 0.7, "iou": iou},
            }
        )
    )
    (run / "metrics" / "pseudo_masks.json").write_text(json.dumps({"val": {"bn7": {"miou": 0.4321}}}))
    out = base / "export"
    assert export_cmd.main(["--run", str(run), "--out", str(out)]) == 0
    return run, out


def test_ungated_graph_has_presence_one_and_plain_softmax(tmp_path):
    torch.manual_seed(1)
    predictor = Predictor(torch.nn.Conv2d(3, 4, 1), None, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    path = tmp_path / "g.onnx"
    export.export_graph(DeployGraph.from_predictor(predictor), path, opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tiles = np.random.default_rng(1).integers(0, 256, (3, 3, 24, 20), dtype=np.uint8)
    classes, scores, presence = session.run(None, {"image": tiles})
    want = predictor(torch.from_numpy(tiles))
    np.testing.assert_array_equal(classes, want.classes().numpy())
    np.testing.assert_allclose(scores, want.scores().numpy(), atol=1e-5)
    assert presence.shape == (3, 4) and (presence == 1).all()


def test_export_writes_checked_model_json_and_card(exported, capsys):
    run, out = exported
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == CLASSES and meta["num_classes"] == 4 and len(meta["palette"]) == 5
    assert meta["patch_size"] == 48 and meta["image_size"] == 32 and meta["gate_threshold"] == 0.1
    assert meta["refine"] == {"iterations": 3, "dilations": [1, 2, 4, 8, 12], "colour_weight": 0.1, "blur_sigma": 1.0}
    assert meta["self_check"]["samples"] == 8 and meta["self_check"]["class_agreement"] >= 0.999
    assert meta["metrics"]["test"]["miou"] == 0.6512
    assert meta["weights"]["segmenter"]["sha256"] == sha256_file(run / "segmenter" / "model.pt")
    assert meta["weights"]["model.onnx"]["sha256"] == sha256_file(out / "model.onnx")
    card = (out / "MODEL_CARD.md").read_text()
    for needle in (
        "## Data",
        "## Method and settings",
        "## Results",
        "## Intended use and limits",
        "## Software and hardware",
        "## How to reproduce",
        "65.12",
        "43.21",
        "mlps export",
        "before the argmax: yes (3 iterations",
    ):
        assert needle in card, needle
    assert not list(out.glob("*.tmp"))


def test_onnx_model_matches_torch_on_patches_and_refuses_bad_input(exported, tiny_shards):
    run, out = exported
    model = OnnxModel(out / "model.onnx", providers=["CPUExecutionProvider"])
    assert (model.classes, model.patch_size, model.num_classes, model.mpp) == (CLASSES, 48, 4, None)
    predictor, _ = create_predictor(run)
    tiles = np.random.default_rng(3).integers(0, 256, (3, 3, 48, 48), dtype=np.uint8)
    got, want = model(tiles), predictor(torch.from_numpy(tiles))
    assert (got["classes"] == want.classes().numpy()).mean() >= 0.999
    np.testing.assert_allclose(model.scores(tiles), want.scores().numpy(), atol=1e-4)
    with pytest.raises(InputError, match="expected uint8"):
        model(tiles.astype(np.float32))
    with pytest.raises(InputError, match="3 RGB channels"):
        model(np.zeros((1, 4, 48, 48), np.uint8))
    with pytest.raises(Exception, match="(?i)type"):  # the graph itself only takes uint8
        model.session.run(None, {"image": tiles.astype(np.float32)})


def test_infer_model_and_infer_run_agree_on_patches_and_a_large_image(exported, tmp_path):
    run, out = exported
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(inputs / "patch.png")
    # a synthetic "slide": smooth blobs, so that windows overlap over structure, not noise
    yy, xx = np.mgrid[:260, :330]
    slide = np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    Image.fromarray(slide.astype(np.uint8)).save(inputs / "slide.png")
    common = ["--input", str(inputs), "--overlap", "0.25", "--batch-size", "16"]
    assert infer.main(["--model", str(out / "model.onnx"), "--out", str(tmp_path / "onnx"), *common]) == 0
    assert infer.main(["--run", str(run), "--out", str(tmp_path / "torch"), *common]) == 0
    for name, shape in (("patch", (48, 48)), ("slide", (260, 330))):
        a = np.asarray(Image.open(tmp_path / "onnx" / f"{name}.png"))
        b = np.asarray(Image.open(tmp_path / "torch" / f"{name}.png"))
        assert a.shape == shape and (a == b).mean() >= 0.999, name
        assert len(np.unique(b)) > 1
    # the streamed path (row bands) of the ONNX backend writes the same files as its whole-image path
    assert (
        infer.main(
            ["--model", str(out / "model.onnx"), "--out", str(tmp_path / "bands"), *common, "--stream-megapixels", "0"]
        )
        == 0
    )
    for name in ("slide.png", "slide_overlay.png"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "bands" / name)), np.asarray(Image.open(tmp_path / "onnx" / name))
        ), name


def test_infer_model_refuses_run_only_flags(exported, tmp_path, capsys):
    _, out = exported
    with pytest.raises(SystemExit):
        infer.parse_args(["--model", str(out / "model.onnx"), "--input", "x", "--out", "y", "--no-gate"])
    assert "fixed by mlps export" in capsys.readouterr().err


def test_self_check_detects_a_graph_that_differs_from_the_torch_model(tmp_path):
    def predictor(seed):
        torch.manual_seed(seed)
        return Predictor(torch.nn.Conv2d(3, 4, 1), None, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)

    path = tmp_path / "a.onnx"
    export.export_graph(DeployGraph.from_predictor(predictor(0)), path, opset=17)
    tiles = [np.random.default_rng(2).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)]
    assert export.self_check(predictor(0), path, tiles)["class_agreement"] == 1.0
    other = export.self_check(predictor(1), path, tiles)
    assert other["class_agreement"] < export.MIN_AGREEMENT and other["max_score_diff"] > 0.01


def test_model_card_cli_writes_the_run_card(exported):
    from mlps_dist.cli import card

    run, _ = exported
    assert card.main(["--run", str(run)]) == 0
    card = (run / "MODEL_CARD.md").read_text()
    assert "| test | 8 | 48x48 |" in card and "digest `" in card and "sha256 of info.json" in card
    assert "| **miou** | 65.12 | 60.00 |" in card and "| val | bn7 | 43.21 |" in card


def test_export_without_test_patches_fails_before_writing(tmp_path, capsys):
    run = make_run(tmp_path / "run", data_root=str(tmp_path / "no-shards"))
    assert export_cmd.main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "info.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.slow
def test_infer_model_in_a_fresh_venv_without_torch(exported, tmp_path):
    """The deployment install as a user makes it, ``pip install "CHECKOUT[deploy]"`` with its
    dependencies resolved: no torch comes with it, and its infer --model writes the same classes
    as infer --run in the training environment."""
    import os
    import shutil
    import subprocess
    import sys

    run, out = exported
    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "mlps_dist", src / "mlps_dist", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def call(*args, check=True):
        return subprocess.run(
            [python, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=check
        )

    call("-m", "pip", "install", "--quiet", f"{src}[deploy]")
    installed = call("-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "onnxruntime==" in installed and "mlps-dist==" in installed, installed
    assert "torch" not in installed, "torch must not be in the deployment venv: " + installed
    assert call("-c", "import torch", check=False).returncode != 0, "torch must not be in the deployment venv"
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    for i, size in enumerate([(48, 48), (70, 90)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inputs / f"p{i}.png")
    proc = call(
        "-m",
        "mlps_dist",
        "infer",
        "--model",
        str(out / "model.onnx"),
        "--input",
        str(inputs),
        "--out",
        str(tmp_path / "deployed"),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert infer.main(["--run", str(run), "--input", str(inputs), "--out", str(tmp_path / "torch")]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "deployed" / f"p{i}.png"))
        b = np.asarray(Image.open(tmp_path / "torch" / f"p{i}.png"))
        assert (a == b).mean() >= 0.999


def test_segment_slides_with_the_exported_model_matches_the_run(exported, tmp_path):
    """The same synthetic slide through `segment_slides --run` (torch) and `--model` (onnxruntime,
    one process): the class maps agree on >= 99.9 % of map pixels and the areas match."""
    from mlps_dist.cli import segment as segment_slides
    from mlps_dist.synthetic.slides import write_synthetic_slide

    run, out = exported
    slide = tmp_path / "slides" / "s0.tiff"
    write_synthetic_slide(slide, None, 768, 512, seed=3, mpp=0.5, cell_px=256)
    common = ["--slides", str(slide), "--model-mpp", "1.0", "--map-mpp", "4", "--batch-size", "8"]
    assert segment_slides.main(["--run", str(run), "--out", str(tmp_path / "torch"), *common]) == 0
    assert segment_slides.main(["--model", str(out / "model.onnx"), "--out", str(tmp_path / "onnx"), *common]) == 0
    maps = [np.asarray(Image.open(tmp_path / side / "s0" / "classes.png")) for side in ("torch", "onnx")]
    assert maps[0].shape == maps[1].shape and maps[0].size > 1000
    assert (maps[0] == maps[1]).mean() >= 0.999
    areas = [
        json.loads((tmp_path / side / "s0" / "summary.json").read_text())["area_mm2"] for side in ("torch", "onnx")
    ]
    assert areas[0].keys() == areas[1].keys()
    for name in areas[0]:
        assert areas[1][name] == pytest.approx(areas[0][name], rel=0.01, abs=1e-4)


def test_segment_slides_model_refuses_run_only_flags(exported, tmp_path):
    from mlps_dist.cli import segment as segment_slides

    _, out = exported
    with pytest.raises(InputError, match="--no-gate"):
        segment_slides._main(
            ["--model", str(out / "model.onnx"), "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--no-gate"]
        )


def test_a_model_json_that_does_not_describe_its_graph_is_refused(exported, tmp_path, tiny_shards):
    import shutil

    from mlps_dist.cli import infer

    _, out = exported
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(tmp_path / "img" / "a.png")
    images = str(tmp_path / "img")
    cases = {"edited": lambda m: {**m, "patch_size": 17}, "empty": lambda m: {}, "list": lambda m: [1, 2]}
    messages = {
        "edited": "was changed after mlps export wrote it",
        "empty": "key 'classes' is missing",
        "list": "expected a JSON object",
    }
    for name, change in cases.items():
        folder = tmp_path / name
        shutil.copytree(out, folder)
        meta = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps(change(meta)))
        with pytest.raises(InputError, match=messages[name]):
            infer._main(["--model", str(folder / "model.onnx"), "--input", images, "--out", str(tmp_path / "p")])
    # A model.json beside another export's graph (as a kill between the two writes leaves it).
    folder = tmp_path / "mixed"
    shutil.copytree(out, folder)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(InputError, match="sha256 differs"):
        infer._main(["--model", str(folder / "model.onnx"), "--input", images, "--out", str(tmp_path / "p")])
