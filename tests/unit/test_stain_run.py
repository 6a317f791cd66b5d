"""data.stain through a run: stage 1's reference file, the datasets, the predictor, and the
exported model all normalise a patch the same way."""

import json

import numpy as np
import pytest
import torch
import yaml
from trained_runs import make_run

from mlps_dist.cli import export
from mlps_dist.config import ConfigError, config_from_dict
from mlps_dist.data.decode import decode_rgb
from mlps_dist.data.shards import open_split
from mlps_dist.data.stain_run import load_normaliser, read_reference, write_reference
from mlps_dist.data.torch_loader import EvalDataset
from mlps_dist.deploy.onnx_model import OnnxModel
from mlps_dist.predict.predictor import create_predictor, sliding_window


def stained_run(tmp_path, tiny_shards, method="macenko"):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards), image_size=32)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["stain"] = {"method": method, "fit_images": 16}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run, config_from_dict(cfg)


def test_stage1_reference_is_written_read_back_and_checked(tmp_path, tiny_shards):
    run, cfg = stained_run(tmp_path, tiny_shards)
    with pytest.raises(ConfigError, match="classifier stage"):
        read_reference(run, "macenko")  # stage 1 has not written it yet
    ref = write_reference(cfg)
    assert ref["method"] == "macenko" and ref["fitted_on"]["patches"] == 16
    assert json.loads((run / "classifier" / "stain.json").read_text()) == ref
    assert write_reference(cfg) == ref  # a pure function of the shards and settings
    with pytest.raises(ConfigError, match="data.stain.method=reinhard"):
        read_reference(run, "reinhard")
    assert load_normaliser(run, "none") is None


def test_dataset_predictor_and_windows_normalise_alike(tmp_path, tiny_shards):
    run, cfg = stained_run(tmp_path, tiny_shards)
    write_reference(cfg)
    predictor, _ = create_predictor(run, num_classes=4)
    assert predictor.stain is not None
    sample = EvalDataset(cfg, open_split(tiny_shards, "test"))[0]
    # the dataset's normalised image is what the predictor makes of the raw patch
    raw = open_split(tiny_shards, "test").read(0)
    rgb = torch.from_numpy(decode_rgb(raw["image"])).permute(2, 0, 1)[None]
    torch.testing.assert_close(predictor.normalise(rgb)[0], sample["image"])
    assert not torch.equal(predictor.normalise(rgb, stain=False)[0], sample["image"])
    # a patch that is one window: the window path normalises it exactly once
    image = rgb[0].permute(1, 2, 0).numpy()
    whole = sliding_window(predictor, image, window=image.shape[0]).classes()
    torch.testing.assert_close(whole, predictor(rgb).classes())


def test_exported_model_normalises_before_its_graph(tmp_path, tiny_shards):
    run, cfg = stained_run(tmp_path, tiny_shards)
    write_reference(cfg)
    out = tmp_path / "export"
    assert export.main(["--run", str(run), "--out", str(out), "--check-limit", "4"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["stain"]["method"] == "macenko"
    model = OnnxModel(out / "model.onnx")
    predictor, _ = create_predictor(run, num_classes=4)
    reader = open_split(tiny_shards, "test")
    tiles = np.stack([decode_rgb(reader.read(i)["image"]).transpose(2, 0, 1) for i in range(2)])
    want = predictor(torch.from_numpy(tiles)).classes().numpy()
    assert (model(tiles)["classes"] == want).mean() > 0.999
    assert not np.array_equal(model(tiles, stain=False)["scores"], model(tiles)["scores"])


def test_config_refuses_stain_normalisation_with_the_dali_loader():
    from mlps_dist.config import load_config

    with pytest.raises(ConfigError, match="data.loader"):
        load_config("configs/luad.yaml", ["data.stain.method=macenko", "data.loader=dali"])
    with pytest.raises(ConfigError, match="data.stain.method"):
        load_config("configs/luad.yaml", ["data.stain.method=vahadane"])
    assert load_config("configs/luad.yaml").data.stain.method == "none"  # the public recipe


def test_od_match_leaves_training_as_it_is_and_matches_every_other_set(tmp_path, tiny_shards):
    from mlps_dist.core.stain_match import OpticalDensityMatcher, SetStain
    from mlps_dist.data.stain_run import split_stain

    run, cfg = stained_run(tmp_path, tiny_shards, method="od_match")
    assert write_reference(cfg)["method"] == "od_match"
    train, test = open_split(tiny_shards, "train"), open_split(tiny_shards, "test")
    assert split_stain(cfg, train) is None  # the reference itself: CAMs and masks unchanged
    raw = decode_rgb(train.read(0)["image"])
    assert np.array_equal(EvalDataset(cfg, train, purpose="masks")[0]["rgb"].permute(1, 2, 0).numpy(), raw)
    stain = split_stain(cfg, test)
    assert isinstance(stain, SetStain) and stain.fixed is not None
    sample = EvalDataset(cfg, test)[1]
    assert np.array_equal(sample["rgb"].permute(1, 2, 0).numpy(), stain(decode_rgb(test.read(1)["image"])))
    predictor, _ = create_predictor(run, num_classes=4)
    assert isinstance(predictor.stain, OpticalDensityMatcher)
    out = tmp_path / "export"
    assert export.main(["--run", str(run), "--out", str(out), "--check-limit", "4"]) == 0
    assert json.loads((out / "model.json").read_text())["stain"]["method"] == "od_match"
    assert isinstance(OnnxModel(out / "model.onnx").stain, OpticalDensityMatcher)


def test_infer_matches_a_paler_set_of_images_back_as_a_whole(tmp_path, tiny_shards):
    from PIL import Image

    from mlps_dist.cli import infer as infer_cmd
    from mlps_dist.core.stain import from_optical_density, optical_density

    run, cfg = stained_run(tmp_path, tiny_shards, method="od_match")
    write_reference(cfg)
    reader = open_split(tiny_shards, "test")
    for name, amount in (("same", 1.0), ("pale", 0.5)):
        (tmp_path / name).mkdir()
        for i in range(len(reader)):
            rgb = from_optical_density(amount * optical_density(decode_rgb(reader.read(i)["image"])))
            Image.fromarray(rgb).save(tmp_path / name / f"{i}.png")

    def classes(name, *flags):
        out = tmp_path / f"out-{name}{''.join(flags)}"
        assert infer_cmd.main(["--run", str(run), "--input", str(tmp_path / name), "--out", str(out), *flags]) == 0
        return np.stack([np.asarray(Image.open(out / f"{i}.png")) for i in range(len(reader))])

    same, pale = classes("same"), classes("pale")
    assert (pale == same).mean() > 0.97
    predictor, _ = create_predictor(run, num_classes=4)
    unmatched = [
        predictor(
            torch.from_numpy(np.array(Image.open(tmp_path / "pale" / f"{i}.png"))).permute(2, 0, 1)[None], stain=False
        )
        .classes()[0]
        .numpy()
        for i in range(len(reader))
    ]
    assert (np.stack(unmatched) != same).mean() > 0.05  # the model does see the paler stain
    assert classes("pale", "--stain-scope", "image").shape == same.shape
