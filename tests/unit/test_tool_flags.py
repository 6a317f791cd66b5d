"""Flags and config values that cannot work are refused in one line, exit 2, before any work
(and before any output folder is created)."""

from __future__ import annotations

import pytest
from tool_runs import run_tool  # noqa: E402

from mlps_dist.config import ConfigError, config_from_dict  # noqa: E402


@pytest.mark.parametrize(
    "flags",
    [
        ["--patch", "-5"],
        ["--patch", "1"],
        ["--batch-size", "0"],
        ["--batch-size", "-2"],
        ["--gate-threshold", "2"],
        ["--gate-threshold", "-1"],
    ],
)
def test_infer_refuses_unusable_flags(flags, tmp_path, capsys):
    from mlps_dist.cli import infer

    (tmp_path / "in").mkdir()
    assert (
        infer.main(["--run", str(tmp_path), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *flags]) == 2
    )
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--mpp", "nan"],
        ["--mpp", "inf"],
        ["--slide-mpp", "nan"],
        ["--tissue-mpp", "0"],
        ["--shard-size", "0"],
        ["--label-min-fraction", "5"],
        ["--split-ratios", "0,1,0"],
    ],
)
def test_tile_slides_refuses_unusable_flags(flags, tmp_path, capsys):
    from mlps_dist.cli import tile as tile_slides
    from mlps_dist.synthetic.slides import write_synthetic_slide

    write_synthetic_slide(tmp_path / "s" / "a.tiff", None, 128, 128, seed=0, cell_px=64)
    base = {"--mpp": "1", "--slides": str(tmp_path / "s"), "--out": str(tmp_path / "o")}
    base.update(dict(zip(flags[::2], flags[1::2])))
    assert tile_slides.main([x for kv in base.items() for x in kv]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags", [["--map-mpp", "nan"], ["--slide-mpp", "nan"], ["--map-mpp", "-1"], ["--model-mpp", "inf"]]
)
def test_segment_slides_refuses_unusable_flags(flags, tmp_path, capsys):
    from mlps_dist.cli import segment as segment_cmd

    assert (
        segment_cmd.main(["--run", str(tmp_path), "--slides", str(tmp_path), "--out", str(tmp_path / "o"), *flags]) == 2
    )
    assert flags[0] in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_make_shards_refuses_an_unusable_mpp_before_creating_out(value, tmp_path):
    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(tmp_path / "src", train=4, val=2, test=2, size=32)
    result = run_tool(
        "-m",
        "mlps_dist",
        "shards",
        "--layout",
        "luad",
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "o"),
        "--mpp",
        value,
    )
    assert result.returncode == 2 and "--mpp" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "key,value",
    [("lr", float("inf")), ("weight_decay", -5.0), ("head_lr_mult", -1.0), ("poly_power", -2.0), ("lr", float("nan"))],
)
def test_config_refuses_unusable_optimiser_values(key, value):
    with pytest.raises(ConfigError, match=f"'classifier.{key}' must be a finite number"):
        config_from_dict({"classifier": {key: value}})


def test_segment_slides_bounds_the_map_before_any_work(tmp_path):
    from slide_fixtures import ColourModel

    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.core.errors import InputError
    from mlps_dist.deploy import segment_slides
    from mlps_dist.synthetic.slides import write_synthetic_slide

    write_synthetic_slide(tmp_path / "s" / "a.tiff", None, 384, 256, seed=0, cell_px=100, flat=True)

    def segment(*extra):
        args = segment_cmd.parse_args(
            ["--run", "unused", "--slides", str(tmp_path / "s"), "--out", str(tmp_path / "o"), *extra]
        )
        return segment_slides.run(args, model=ColourModel())

    with pytest.raises(InputError, match=r"--map-mpp 0.5: finer than the 1 um/px of slide a's own pixels"):
        segment("--map-mpp", "0.5")
    with pytest.raises(InputError, match=r"needs about 0.0\d* GB .* use --map-mpp (\S+) or coarser") as err:
        segment("--map-mpp", "1", "--max-map-gb", "0.001")
    fits = err.value.args[0].split("use --map-mpp ")[1].split()[0]
    assert not (tmp_path / "o" / "a").exists()
    assert segment("--map-mpp", fits, "--max-map-gb", "0.001") == 0  # the suggested setting fits


def test_make_shards_refuses_mixed_training_patch_sizes_unless_allowed(tmp_path):
    from PIL import Image

    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(tmp_path / "src", train=6, val=2, test=2, size=32)
    odd = sorted((tmp_path / "src" / "train").glob("*.png"))[0]
    Image.open(odd).resize((20, 28)).save(odd)
    args = [
        "-m",
        "mlps_dist",
        "shards",
        "--layout",
        "luad",
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "o"),
    ]
    result = run_tool(*args)
    assert result.returncode == 2 and "32x32: 5, 20x28: 1" in result.stderr and odd.name in result.stderr
    assert not (tmp_path / "o").exists()
    assert run_tool(*args, "--allow-mixed-sizes").returncode == 0


def test_export_refuses_an_out_that_is_or_lies_inside_the_run(tmp_path, capsys):
    from trained_runs import make_run

    from mlps_dist.cli import export

    run = make_run(tmp_path / "run")
    for out in (run, run / "export"):
        assert export.main(["--run", str(run), "--out", str(out)]) == 2
        assert "--run" in capsys.readouterr().err
    assert not (run / "model.onnx").exists() and not (run / "export").exists()
