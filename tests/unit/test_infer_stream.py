"""infer's streamed path: images read, predicted and written by row bands give the same files
as the whole-image path; the PNG row reader and writer agree with Pillow; stains estimated
once and applied band by band."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, features
from trained_runs import make_run  # noqa: E402

from mlps_dist.cli import infer as infer_cmd
from mlps_dist.core import png as png_codec  # noqa: E402
from mlps_dist.core.imagerows import PngRows, open_rows, png_streamable  # noqa: E402
from mlps_dist.core.pngstream import PngRowWriter  # noqa: E402
from mlps_dist.core.tiffrows import TiffRows, tiff_streamable  # noqa: E402
from mlps_dist.deploy import infer  # noqa: E402

SAME_ZLIB = features.version("zlib") == zlib.ZLIB_RUNTIME_VERSION  # the deflate bytes match only then
PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (250, 200, 0), (255, 255, 255)]


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour with noise: rows pick different PNG filters, as tissue does."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    wave = (np.sin(x / 9.0) * np.cos(y / 7.0) + 1) * 60
    return np.clip(
        np.stack([150 + wave, 90 + wave / 2, 170 - wave / 3], -1) + rng.integers(0, 20, (h, w, 3)), 0, 255
    ).astype(np.uint8)


def colour_modes(folder: Path) -> None:
    """One file per colour mode PngRows streams, a JPEG (decoded whole, written by bands) and
    three TIFFs TiffRows streams."""
    folder.mkdir(parents=True)
    rgb = texture(150, 170)
    Image.fromarray(rgb).save(folder / "rgb.png")
    alpha = np.random.default_rng(1).integers(0, 256, (150, 170, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0], "L").save(folder / "grey.png")
    Image.fromarray(np.stack([rgb[..., 1], alpha[..., 0]], -1), "LA").save(folder / "la.png")
    indices = Image.fromarray((rgb[..., 0] // 13).astype(np.uint8), "P")  # 20 colours: an 8-bit palette
    indices.putpalette([v for i in range(20) for v in (12 * i, 255 - 12 * i, 90)])
    indices.save(folder / "palette.png", transparency=2)
    few = Image.fromarray((rgb[..., 0] // 52).astype(np.uint8), "P")  # 5 colours: Pillow writes 4 bits a pixel
    few.putpalette([v for c in PALETTE for v in c])
    few.save(folder / "palette4.png")
    Image.fromarray(rgb[..., 2].astype(np.uint16) * 200).save(folder / "deep.png")  # 16-bit grey
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    # TIFFs TiffRows streams: JPEG tiles cut at the right and bottom edges, LZW strips with
    # alpha, deflate grey
    tifffile.imwrite(folder / "tiled.tif", rgb, tile=(64, 64), compression="jpeg", photometric="rgb")
    tifffile.imwrite(
        folder / "strips.tif",
        np.concatenate([rgb, alpha], -1),
        rowsperstrip=32,
        compression="lzw",
        photometric="rgb",
        extrasamples=["unassalpha"],
    )
    tifffile.imwrite(
        folder / "grey_tiff.tif", rgb[..., 1], rowsperstrip=50, compression="zlib", photometric="minisblack"
    )


def test_streamed_outputs_are_the_whole_image_path_bytes(tmp_path):
    """--stream-megapixels 0 sends every image through stream_image: the class PNGs (and
    overlays) must be the same files as the whole-image path writes."""
    run = make_run(tmp_path / "run")
    colour_modes(tmp_path / "in")
    flags = [
        "--run",
        str(run),
        "--input",
        str(tmp_path / "in"),
        "--patch",
        "40",
        "--overlap",
        "0.25",
        "--batch-size",
        "3",
    ]
    assert infer_cmd.main([*flags, "--out", str(tmp_path / "whole")]) == 0
    assert infer_cmd.main([*flags, "--out", str(tmp_path / "bands"), "--stream-megapixels", "0"]) == 0
    written = sorted(p.name for p in (tmp_path / "whole").glob("*.png"))
    assert len(written) == 22 and written == sorted(p.name for p in (tmp_path / "bands").glob("*.png"))
    for name in written:
        whole, bands = tmp_path / "whole" / name, tmp_path / "bands" / name
        assert np.array_equal(np.asarray(Image.open(whole)), np.asarray(Image.open(bands))), name
        if SAME_ZLIB:
            assert whole.read_bytes() == bands.read_bytes(), name
    assert len(np.unique(np.asarray(Image.open(tmp_path / "bands" / "rgb.png")))) > 1  # not a flat map


@pytest.mark.skipif(not SAME_ZLIB, reason="Pillow's zlib differs from Python's: same pixels, other deflate bytes")
def test_png_row_writer_writes_pillows_bytes_band_by_band():
    rgb = texture(97, 1300)
    for band in (1, 13, 97):
        f = io.BytesIO()
        png = PngRowWriter(f, 1300, 97)
        for top in range(0, 97, band):
            png.write(rgb[top : top + band])
        png.close()
        assert f.getvalue() == png_codec.encode(rgb), band
    classes = (rgb[..., 0] // 52).astype(np.uint8)
    f = io.BytesIO()
    png = PngRowWriter(f, 1300, 97, palette=PALETTE)
    png.write(classes[:40])
    png.write(classes[40:])
    png.close()
    assert f.getvalue() == png_codec.encode_indices(classes, PALETTE, full_palette=True)
    with pytest.raises(ValueError, match="rows written"):
        PngRowWriter(io.BytesIO(), 4, 4).close()


def test_png_rows_give_the_pixels_of_the_whole_decode_across_band_edges(tmp_path):
    colour_modes(tmp_path / "in")
    assert not png_streamable(tmp_path / "in" / "palette4.png")  # decoded whole (ArrayRows)
    for path in sorted(set((tmp_path / "in").glob("*.png")) - {tmp_path / "in" / "palette4.png"}):
        assert png_streamable(path), path.name
        source = PngRows(path, band=7)  # bands of 7 rows: most filters refer to the band above
        rows = []
        for top in range(0, source.height, 11):
            rows.append(source.rows(top, top + 11).copy())
            source.release(top + 11)
        source.close()
        np.testing.assert_array_equal(np.concatenate(rows), infer.load_rgb(path), err_msg=path.name)
    assert not png_streamable(tmp_path / "in" / "photo.jpg")
    assert type(open_rows(tmp_path / "in" / "photo.jpg")).__name__ == "ArrayRows"


def test_tiff_rows_give_the_pixels_of_pillows_whole_decode(tmp_path):
    colour_modes(tmp_path / "in")
    for name in ("tiled.tif", "strips.tif", "grey_tiff.tif"):
        path = tmp_path / "in" / name
        assert tiff_streamable(path), name
        source = open_rows(path)
        assert isinstance(source, TiffRows), name
        rows = []
        for top in range(0, source.height, 23):  # across strip and tile-row edges
            rows.append(source.rows(top, top + 23).copy())
            source.release(top + 23)
        source.close()
        np.testing.assert_array_equal(np.concatenate(rows), infer.load_rgb(path), err_msg=name)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, texture(40, 30).transpose(2, 0, 1), planarconfig="separate", photometric="rgb")
    assert not tiff_streamable(planar) and type(open_rows(planar)).__name__ == "ArrayRows"


def test_a_png_truncated_mid_image_is_named_and_leaves_no_output(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (tmp_path / "in").mkdir()
    Image.fromarray(texture(300, 200)).save(tmp_path / "in" / "cut.png")
    data = (tmp_path / "in" / "cut.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(data[: len(data) // 2])  # the header still reads
    out = tmp_path / "out"
    assert (
        infer_cmd.main(
            [
                "--run",
                str(run),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(out),
                "--patch",
                "64",
                "--stream-megapixels",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cut.png: cannot be read as an image" in err and "Traceback" not in err
    assert not list(out.glob("*.png")) and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stains_estimated_once_then_applied_by_band_match_the_whole_image(method):
    from mlps_dist.core.stain import StainNormaliser, fit_reference

    images = [texture(64, 64, seed) for seed in range(4)]
    normaliser = StainNormaliser(fit_reference(method, images))
    rgb = np.concatenate([texture(90, 120, 7), texture(30, 120, 8) // 2 + 120])
    estimate = normaliser.estimate(rgb)
    bands = np.concatenate([normaliser.apply(rgb[top : top + 25], estimate) for top in range(0, 120, 25)])
    whole = normaliser(rgb)
    assert (whole != rgb).any()  # the normalisation changes the image, so the comparison means something
    assert np.abs(bands.astype(int) - whole).max() <= 1  # float rounding of the estimate at most
    assert (bands == whole).mean() > 0.999
