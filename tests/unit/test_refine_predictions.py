"""evaluate.refine: the segmenter's scores refined along the patch's colours in the one
prediction path (Predictor), its ONNX graph, and every consumer built by create_predictor."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from trained_runs import make_run

from mlps_dist.predict import export
from mlps_dist.predict.export_graph import DeployGraph
from mlps_dist.predict.predictor import Predictor, create_predictor

REFINE = dict(iterations=30, dilations=(1, 2, 4, 8), colour_weight=0.1, blur_sigma=1.0)
MEAN, STD = [0.5] * 3, [0.25] * 3


class BlurryBorder(torch.nn.Module):
    """A 'segmenter' whose two-class logits cross at column 22 whatever the image shows, at
    half the input's resolution (as a stride-4 network's come out coarser than the input)."""

    def forward(self, x):
        width = x.shape[-1] // 2
        column = torch.arange(width, dtype=torch.float32).view(1, 1, width).expand(x.shape[0], x.shape[-2] // 2, width)
        return torch.stack([(10.75 - column) / 4, torch.zeros_like(column)], dim=1)


def two_tissue_patch(n: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, size, size): pink left of column 16, purple right of it, with noise; and the truth."""
    gen = torch.Generator().manual_seed(0)
    rgb = torch.empty(n, 3, size, size)
    rgb[..., :16] = torch.tensor([230.0, 150.0, 200.0]).view(1, 3, 1, 1)
    rgb[..., 16:] = torch.tensor([120.0, 70.0, 170.0]).view(1, 3, 1, 1)
    rgb = (rgb + 6 * torch.randn(rgb.shape, generator=gen)).clamp(0, 255).round().to(torch.uint8)
    truth = torch.zeros(n, size, size, dtype=torch.long)
    truth[..., 16:] = 1
    return rgb, truth


def test_refined_predictions_put_the_border_on_the_colour_edge():
    rgb, truth = two_tissue_patch(2)
    plain = Predictor(BlurryBorder(), None, image_size=32, mean=MEAN, std=STD)(rgb)
    refined = Predictor(BlurryBorder(), None, image_size=32, mean=MEAN, std=STD, refine=REFINE)(rgb)
    assert (plain.classes() != truth).sum() >= 2 * 32 * 5  # the network's border, 6 columns off
    assert (refined.classes() != truth).sum() <= 2 * 32  # the refined one, on the edge
    assert refined.logits.shape == (2, 2, 32, 32) and torch.isfinite(refined.logits).all()
    torch.testing.assert_close(refined.scores().sum(dim=1), torch.ones(2, 32, 32))  # log-scores: still a softmax
    # at another output size the refined scores are upsampled like plain logits
    big = Predictor(BlurryBorder(), None, image_size=32, mean=MEAN, std=STD, refine=REFINE)(rgb, out_size=(64, 64))
    assert big.classes().shape == (2, 64, 64) and (big.classes()[:, ::2, ::2] != truth).sum() <= 2 * 32


def test_create_predictor_takes_the_refinement_from_the_run_config(tmp_path):
    run = make_run(tmp_path / "run")
    assert create_predictor(run)[0].refine is None  # off unless the config turns it on
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["evaluate"]["refine"] = {"enabled": True, "iterations": 7, "dilations": [1, 3]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    predictor, _ = create_predictor(run)
    assert predictor.refine == {"iterations": 7, "dilations": [1, 3], "colour_weight": 0.1, "blur_sigma": 1.0}
    image = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = Predictor(
        predictor.segmenter,
        predictor.classifier,
        image_size=32,
        mean=predictor.mean.flatten().tolist(),
        std=predictor.std.flatten().tolist(),
    )(image)
    assert not torch.allclose(predictor(image).scores(), plain.scores())


def test_refine_settings_are_none_when_off():
    from mlps_dist.config import load_config

    assert load_config("configs/luad.yaml").evaluate.refine.as_kwargs() is None  # the public recipe: the plain argmax
    assert load_config("configs/demo.yaml").evaluate.refine.as_kwargs()["iterations"] == 20


@pytest.mark.parametrize("image_size", [32, 0])
def test_exported_graph_refines_as_the_predictor_does(tmp_path, image_size):
    torch.manual_seed(0)
    segmenter = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Upsample(scale_factor=0.5, mode="bilinear")
    )
    # few iterations: the graph unrolls every one of them (the check is the same computation)
    predictor = Predictor(
        segmenter, None, image_size=image_size, mean=MEAN, std=STD, refine={**REFINE, "iterations": 4}
    )
    path = tmp_path / "g.onnx"
    export.export_graph(DeployGraph.from_predictor(predictor), path, opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n, h, w in [(2, 32, 32), (1, 48, 40)]:
        tiles = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
        classes, scores, _ = session.run(None, {"image": tiles})
        want = predictor(torch.from_numpy(tiles))
        agree = (classes == want.classes().numpy()).mean()
        assert agree > 0.999, agree  # float rounding may flip a near tie
        np.testing.assert_allclose(scores, want.scores().numpy(), atol=1e-4)
