"""A second, independent synthetic H&E generator, kept only to measure settings on data they
were not tuned on (never tune the demo on it).

    python tools/make_synthetic_alt.py --out data/alt/raw --size 224 --train 600 --val 40 --test 80
    mlps shards --layout luad --src data/alt/raw --out data/alt/shards
    launch/pipeline.sh configs/demo.yaml runs/alt data.root=data/alt/shards

It shares nothing with mlps synthetic: warped Voronoi regions instead of smooth
random fields, nuclei and fibres drawn as PIL shapes in direct RGB colours instead of
Beer-Lambert stain rendering, 224 px patches by default, elliptic white holes (grey 238-252,
mask index 4). Output: the LUAD-HistoSeg folder layout (train names carry the patch labels).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PAL = [205, 51, 51, 0, 255, 0, 65, 105, 225, 255, 165, 0, 255, 255, 255]


def regions(rng, size, k):
    pts = rng.uniform(0, size, (k, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # warped distances for wavy borders
    wy = np.sin(xx / rng.uniform(8, 30) + rng.uniform(0, 6)) * rng.uniform(2, 10)
    wx = np.cos(yy / rng.uniform(8, 30) + rng.uniform(0, 6)) * rng.uniform(2, 10)
    d = np.stack([(yy + wy - p[0]) ** 2 + (xx + wx - p[1]) ** 2 for p in pts])
    return d.argmin(0)


def tissue(rng, cls, size, p):
    img = Image.new("RGB", (size, size))
    dr = ImageDraw.Draw(img)
    s = p["nuc"]
    if cls == 0:  # tumour epithelium: pink-purple cytoplasm, big crowded vesicular nuclei
        base = np.array([200, 140, 190]) * p["tone"]
        img.paste(tuple(int(v) for v in base), (0, 0, size, size))
        n = int(size * size / (s * 9) ** 2 * 3.5)
        for _ in range(n):
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(3.5, 6) * s
            c = (np.array([90, 50, 140]) * p["htone"] * rng.uniform(0.85, 1.15)).astype(int)
            dr.ellipse(
                [x - r, y - r * rng.uniform(0.7, 1), x + r, y + r], fill=tuple(c), outline=tuple((c * 0.7).astype(int))
            )
    elif cls == 1:  # necrosis: pale pink smudge with karyorrhectic dust
        base = np.array([225, 160, 200]) * p["tone"]
        img.paste(tuple(int(v) for v in base), (0, 0, size, size))
        for _ in range(int(size * size / 60)):
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(0.5, 1.8) * s
            c = (np.array([120, 60, 150]) * p["htone"] * rng.uniform(0.8, 1.3)).astype(int)
            dr.ellipse([x - r, y - r, x + r, y + r], fill=tuple(c))
        img = img.filter(ImageFilter.GaussianBlur(1.2))
    elif cls == 2:  # lymphocytes: dense small round dark nuclei
        base = np.array([215, 180, 215]) * p["tone"]
        img.paste(tuple(int(v) for v in base), (0, 0, size, size))
        n = int(size * size / (s * 5.5) ** 2 * 1.3)
        for _ in range(n):
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(2, 3) * s
            c = (np.array([55, 35, 110]) * p["htone"] * rng.uniform(0.8, 1.2)).astype(int)
            dr.ellipse([x - r, y - r, x + r, y + r], fill=tuple(c))
    else:  # stroma: pink fibres, sparse spindle nuclei
        base = np.array([235, 165, 190]) * p["tone"]
        img.paste(tuple(int(v) for v in base), (0, 0, size, size))
        ang = rng.uniform(0, np.pi)
        for _ in range(int(size / 2)):
            x, y = rng.uniform(-20, size + 20, 2)
            L = rng.uniform(20, 60)
            a = ang + rng.normal(0, 0.25)
            c = (np.array([215, 110, 160]) * p["tone"] * rng.uniform(0.85, 1.05)).astype(int)
            dr.line([x, y, x + L * np.cos(a), y + L * np.sin(a)], fill=tuple(c), width=int(rng.integers(1, 4)))
        for _ in range(int(size * size / 900)):
            x, y = rng.uniform(0, size, 2)
            L = rng.uniform(4, 9) * s
            a = ang + rng.normal(0, 0.2)
            c = (np.array([90, 50, 140]) * p["htone"]).astype(int)
            dr.line([x, y, x + L * np.cos(a), y + L * np.sin(a)], fill=tuple(c), width=max(1, int(2 * s)))
    return np.asarray(img, np.float32)


def patch(rng, size):
    p = {"tone": rng.uniform(0.9, 1.05), "htone": rng.uniform(0.8, 1.2), "nuc": rng.uniform(0.8, 1.25)}
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    classes = rng.choice(4, size=k, replace=False, p=[0.35, 0.15, 0.2, 0.3])
    lab = regions(rng, size, k)
    mask = classes[lab]
    img = np.zeros((size, size, 3), np.float32)
    for c in classes:
        t = tissue(rng, int(c), size, p)
        img[mask == c] = t[mask == c]
    if rng.random() < 0.35:  # white holes
        yy, xx = np.mgrid[0:size, 0:size]
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(0.1, 0.3) * size
        hole = (yy - cy) ** 2 / r**2 + (xx - cx) ** 2 / (r * rng.uniform(0.6, 1.4)) ** 2 < 1
        img[hole] = rng.uniform(238, 252)
        mask = mask.copy()
        mask[hole] = 4
    img = Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.6)
    )
    present = [int((mask == c).mean() > 0.01) for c in range(4)]
    if sum(present) == 0:
        return patch(rng, size)
    mask[(mask < 4) & ~np.isin(mask, [c for c in range(4) if present[c]])] = 4
    return img, mask.astype(np.uint8), present


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--out")
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--train", type=int, default=600)
    a.add_argument("--val", type=int, default=40)
    a.add_argument("--test", type=int, default=80)
    a.add_argument("--seed", type=int, default=7)
    x = a.parse_args()
    out = Path(x.out)
    for split, n in (("train", x.train), ("val", x.val), ("test", x.test)):
        for i in range(n):
            rng = np.random.default_rng([x.seed, {"train": 0, "val": 1, "test": 2}[split], i])
            img, mask, present = patch(rng, x.size)
            name = f"S{split[0]}{i // 50}-{(i % 50) * x.size}-{i * 7}"
            if split == "train":
                d = out / "train"
                d.mkdir(parents=True, exist_ok=True)
                img.save(d / f"{name}-[{' '.join(map(str, present))}].png")
            else:
                (out / split / "img").mkdir(parents=True, exist_ok=True)
                (out / split / "mask").mkdir(parents=True, exist_ok=True)
                img.save(out / split / "img" / f"{name}.png")
                m = Image.fromarray(mask, "L").convert("P")
                m.putpalette(PAL + [0] * (768 - len(PAL)))
                m.save(out / split / "mask" / f"{name}.png")


if __name__ == "__main__":
    main()
