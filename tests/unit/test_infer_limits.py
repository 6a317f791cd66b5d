"""infer on hostile images: an over-limit image refused in one line, --out created only after
--input was checked, 16-bit images scaled by their bit depth. (Peak memory on large images is
measured by tools/bench_infer.py; tests/unit/test_infer_stream.py checks the streamed path's output.)"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def run_infer(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mlps_dist", "infer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    return proc.returncode, proc.stderr


def test_an_image_over_the_pixel_limit_is_refused_in_one_line(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "a.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    rc, err = run_infer(["--run", str(tmp_path), "--input", str(tmp_path / "bomb"), "--out", str(tmp_path / "p")])
    assert rc == 2, err
    assert "--max-megapixels" in err and "Traceback" not in err
    # A missing --input creates no --out.
    rc, err = run_infer(["--run", str(tmp_path), "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "q")])
    assert rc == 2 and not (tmp_path / "q").exists(), err


def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    from mlps_dist.deploy.infer import load_rgb

    for name, top in (("dim", 1000), ("bright", 65535)):
        Image.fromarray(np.full((8, 8), top, np.uint16)).save(tmp_path / f"{name}.png")
    assert load_rgb(tmp_path / "dim.png").max() == round(1000 / 65535 * 255)  # not stretched to 255
    assert load_rgb(tmp_path / "bright.png").max() == 255
