"""Config loading, overrides and the error messages users see."""

import pytest
import yaml

from mlps_dist.config import ConfigError, load_config, parse_cli, save_config


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "seed: 3\nclassifier:\n  epochs: 5\n  pda:\n    gamma_min: 0.7\n")
    cfg = load_config(
        path,
        [
            "classifier.epochs=7",
            "masks.layers=[b5_2, bn7]",
            "segmenter.loss_layers=bn7",
            "segmenter.loss_weights=[1.0]",
        ],
    )
    assert cfg.seed == 3
    assert cfg.classifier.epochs == 7  # override wins over the file
    assert cfg.classifier.pda.gamma_min == 0.7
    assert cfg.masks.layers == ["b5_2", "bn7"]
    assert cfg.segmenter.loss_weights == [1.0]
    assert cfg.segmenter.epochs == 1  # untouched default


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "classifier:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "classifier.epoch" in msg and "classifier.epochs" in msg


def test_wrong_type_and_bad_value_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="classifier.lr"):
        load_config(None, ["classifier.lr=fast"])
    with pytest.raises(ConfigError, match="segmenter.parallel"):
        load_config(None, ["segmenter.parallel=fsdp"])
    with pytest.raises(ConfigError, match="segmenter.loss_weights"):
        load_config(None, ["segmenter.loss_weights=[0.5]"])
    with pytest.raises(ConfigError, match="segmenter.loss_layers"):
        load_config(None, ["masks.layers=[bn7]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["classifier.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="classifier.pretrained"):
        load_config(None, ["classifier.pretrained=/nonexistent/weights.pth"])
    with pytest.raises(ConfigError, match="masks.background.max_saturation"):
        load_config(None, ["masks.background.max_saturation=300"])
    with pytest.raises(ConfigError, match="segmenter.mosaic_prob"):
        load_config(None, ["segmenter.mosaic_prob=1.5"])


def test_section_given_as_scalar_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="section"):
        load_config(write(tmp_path, "data: shards/\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["classifier.epochs=4", "run_dir=" + str(tmp_path / "run")])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["classifier"]["epochs"] == 4


def test_every_shipped_config_loads():
    from pathlib import Path

    shipped = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    for path in shipped:
        load_config(path)


def test_cli_parses_config_and_overrides(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    cfg = parse_cli(["--config", str(path), "seed=9", "data.loader=dali"])
    assert cfg.seed == 9 and cfg.data.loader == "dali"


def _shards_info(tmp_path, side: int | None):
    import json

    root = tmp_path / f"shards{side}"
    root.mkdir()
    size = [side, side] if side else None
    (root / "info.json").write_text(json.dumps({"format": 1, "splits": {"train": {"image_size": size}}}))
    return root


@pytest.mark.parametrize("side, expected", [(96, 64), (224, 96), (256, 104), (130, 64), (None, 64)])
def test_max_downscale_raises_the_working_size_of_large_patches_only(tmp_path, side, expected):
    root = _shards_info(tmp_path, side)
    cfg = load_config(None, [f"data.root={root}", "data.image_size=64", "data.max_downscale=2.5"])
    assert cfg.data.image_size == expected
    # The saved config resolves to itself: a run's tools see the size it trained at.
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").data.image_size == expected


def test_max_downscale_off_or_without_shards_keeps_the_size(tmp_path):
    root = _shards_info(tmp_path, 224)
    assert load_config(None, [f"data.root={root}", "data.image_size=64"]).data.image_size == 64
    assert (
        load_config(None, [f"data.root={tmp_path}/none", "data.image_size=64", "data.max_downscale=2"]).data.image_size
        == 64
    )
    assert load_config(None, [f"data.root={root}", "data.max_downscale=2"]).data.image_size == 0  # stored size
    with pytest.raises(ConfigError, match="data.max_downscale"):
        load_config(None, ["data.max_downscale=0.5"])


def test_the_demo_trains_large_patches_at_a_larger_size(tmp_path):
    """The demo's 64 px suits its 96 px patches; LUAD-HistoSeg's 224 px ones train at 96 px."""
    assert load_config("configs/demo.yaml", [f"data.root={_shards_info(tmp_path, 224)}"]).data.image_size == 96
    assert load_config("configs/demo.yaml", [f"data.root={_shards_info(tmp_path, 96)}"]).data.image_size == 64


def test_skip_bad_flag_sets_the_stage_key_and_only_where_a_stage_offers_it():
    from mlps_dist.config import parse_cli

    cfg = parse_cli(["--config", "configs/demo.yaml", "--skip-bad"], skip_bad_key="masks.skip_bad")
    assert cfg.masks.skip_bad and not cfg.evaluate.skip_bad
    assert not parse_cli(["--config", "configs/demo.yaml"], skip_bad_key="masks.skip_bad").masks.skip_bad
    with pytest.raises(SystemExit):  # a training stage has no skip: the flag is unknown there
        parse_cli(["--config", "configs/demo.yaml", "--skip-bad"])
