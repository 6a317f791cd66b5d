"""Sliding windows over large images, in numpy only (usable without torch).

An image larger than the training patch is cut into windows of the patch size; each window
is predicted as evaluation predicts a patch (training-scale resize, segmenter, gate, back
to the window's size) and the per-window outputs are blended:

    blended rule: the *gated scores* (softmax after the gate) are averaged over the windows
    covering a pixel; the class is the argmax of that average.

A class gated off in a window scores exactly 0 there, so a class that no covering window
allows can never win a pixel; each window applies the all-gated-off fallback on its own.
The rule needs nothing but each window's ``scores``, so the torch predictor
(predict.sliding_window), the exported ONNX model (deploy.OnnxModel) and the slide tools
all blend the same way and agree up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

DECIDE_ROWS = 64  # rows divided and argmaxed at once


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Starts of windows covering ``range(length)``; the last one flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(round(window * (1 - overlap))))
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def window_boxes(height: int, width: int, window: int, overlap: float) -> list[tuple[int, int]]:
    """(y, x) of every window, row by row."""
    return [(y, x) for y in window_starts(height, window, overlap) for x in window_starts(width, window, overlap)]


def blend_scores(
    scores_fn: Callable[[np.ndarray], np.ndarray],
    rgb: np.ndarray,
    window: int,
    overlap: float = 0.5,
    batch_size: int = 8,
) -> np.ndarray:
    """Average gated scores (C, H, W) float32 of an (H, W, 3) uint8 image.

    ``scores_fn``: uint8 tiles (N, 3, h, w) -> float32 scores (N, C, h, w) (deploy.OnnxModel.scores
    or any model with that contract)."""
    h, w = rgb.shape[:2]
    image = np.ascontiguousarray(np.asarray(rgb, np.uint8).transpose(2, 0, 1))
    wh, ww = min(window, h), min(window, w)
    boxes = window_boxes(h, w, window, overlap)
    total = count = None
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        tiles = np.stack([image[:, y : y + wh, x : x + ww] for y, x in chunk])
        scores = np.asarray(scores_fn(tiles), np.float32)
        if total is None:
            total = np.zeros((scores.shape[1], h, w), np.float32)
            count = np.zeros((1, h, w), np.float32)
        for i, (y, x) in enumerate(chunk):
            total[:, y : y + wh, x : x + ww] += scores[i]
            count[:, y : y + wh, x : x + ww] += 1
    return total / count


def segment_image(
    scores_fn: Callable[[np.ndarray], np.ndarray],
    rgb: np.ndarray,
    window: int,
    overlap: float = 0.5,
    batch_size: int = 8,
) -> np.ndarray:
    """(H, W) uint8 class indices of an (H, W, 3) uint8 image, blended as above, in row bands
    (``segment_bands`` over the image in memory)."""
    from mlps_dist.core.imagerows import ArrayRows

    out = np.empty(rgb.shape[:2], np.uint8)
    for top, classes in segment_bands(scores_fn, ArrayRows(np.asarray(rgb, np.uint8)), window, overlap, batch_size):
        out[top : top + len(classes)] = classes
    return out


def segment_bands(
    scores_fn: Callable[[np.ndarray], np.ndarray], source, window: int, overlap: float = 0.5, batch_size: int = 8
) -> Iterator[tuple[int, np.ndarray]]:
    """(top, uint8 class rows) of an image read by rows (imagerows: ``source.rows(top, bottom)``,
    ``source.release(row)``), top to bottom; the caller may read ``source``'s rows of a band
    before asking for the next one (they are released after).

    The windows are predicted in the same order and batches as ``blend_scores`` and each
    pixel's scores are summed in the same order, so the classes equal
    ``blend_scores(...).argmax(0)``; but only the rows that windows still to come can touch
    are held as float scores: a pixel row is decided (argmax) and its sums dropped as soon as
    no later window covers it. Memory: C x (window + a batch of window rows) x W floats, and
    the image rows the windows of one batch span, not C x H x W."""
    h, w = source.height, source.width
    wh, ww = min(window, h), min(window, w)
    boxes = window_boxes(h, w, window, overlap)
    cover_x = np.zeros(w, np.float32)
    for x in window_starts(w, window, overlap):
        cover_x[x : x + ww] += 1
    cover_y = np.zeros(h, np.float32)
    for y in window_starts(h, window, overlap):
        cover_y[y : y + wh] += 1
    total, top = None, 0  # total: (C, rows, W) sums of the rows [top, top + rows)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        above = chunk[0][0]  # boxes run row by row: the first window of a batch is the highest
        bottom = max(y for y, _ in chunk) + wh
        band = source.rows(above, bottom)
        tiles = np.stack([band[y - above : y - above + wh, x : x + ww].transpose(2, 0, 1) for y, x in chunk])
        scores = np.asarray(scores_fn(tiles), np.float32)
        if scores.shape[1] > 255:
            raise ValueError(f"{scores.shape[1]} classes do not fit the uint8 class map")
        if total is None:
            total = np.zeros((scores.shape[1], bottom - top, w), np.float32)
        elif top + total.shape[1] < bottom:
            grow = np.zeros((scores.shape[1], bottom - top - total.shape[1], w), np.float32)
            total = np.concatenate([total, grow], axis=1)
        for i, (y, x) in enumerate(chunk):
            total[:, y - top : y - top + wh, x : x + ww] += scores[i]
        done = boxes[first + batch_size][0] if first + batch_size < len(boxes) else h  # rows above are final
        if done > top:
            decided = np.empty((done - top, w), np.uint8)
            for r0 in range(0, done - top, DECIDE_ROWS):  # in slices: the division's temporaries stay small
                r1 = min(r0 + DECIDE_ROWS, done - top)
                count = cover_y[top + r0 : top + r1, None] * cover_x[None, :]
                decided[r0:r1] = (total[:, r0:r1] / count[None]).argmax(0)
            yield top, decided
            source.release(done)
            total, top = total[:, done - top :], done
