"""infer on large and hostile images: memory set by the window and the image's width (not
~66 bytes per pixel), an over-limit image refused in one line, --out created only after
--input was checked."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_infer import make_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb(args: list[str]) -> tuple[int, float, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mlps_dist.infer", *args], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                       "OMP_NUM_THREADS": "1"})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, err


def test_a_large_image_is_predicted_in_bounded_memory(tmp_path):
    run = make_run(tmp_path / "run")
    for name, side in (("small", 256), ("big", 3000)):
        (tmp_path / name).mkdir()
        rgb = np.random.default_rng(0).integers(150, 230, (side, side, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / name / "a.png", compress_level=1)
    flags = ["--patch", "500", "--overlap", "0", "--batch-size", "2"]
    rc, small, err = peak_rss_mb(["--run", str(run), "--input", str(tmp_path / "small"), "--out",
                                  str(tmp_path / "ps"), *flags])
    assert rc == 0, err
    rc, big, err = peak_rss_mb(["--run", str(run), "--input", str(tmp_path / "big"), "--out",
                                str(tmp_path / "pb"), *flags])
    assert rc == 0, err
    pixels = 3000 * 3000
    assert (big - small) * 1e6 / pixels < 30, (small, big)  # was ~66 bytes per pixel
    pred = np.asarray(Image.open(tmp_path / "pb" / "a.png"))
    assert pred.shape == (3000, 3000) and pred.max() < 4


def test_an_image_over_the_pixel_limit_is_refused_in_one_line(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000,
                                              30000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                                              + chunk(b"IEND", b""))
    rc, _, err = peak_rss_mb(["--run", str(tmp_path), "--input", str(tmp_path / "bomb"), "--out", str(tmp_path / "p")])
    assert rc == 2, err
    assert "--max-megapixels" in err and "Traceback" not in err
    # A missing --input creates no --out.
    rc, _, err = peak_rss_mb(["--run", str(tmp_path), "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "q")])
    assert rc == 2 and not (tmp_path / "q").exists(), err


def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    from mlps_dist.infer import load_rgb

    for name, top in (("dim", 1000), ("bright", 65535)):
        Image.fromarray(np.full((8, 8), top, np.uint16)).save(tmp_path / f"{name}.png")
    assert load_rgb(tmp_path / "dim.png").max() == round(1000 / 65535 * 255)  # not stretched to 255
    assert load_rgb(tmp_path / "bright.png").max() == 255
