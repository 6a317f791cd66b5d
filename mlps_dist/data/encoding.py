"""How shards store their images: the encodings ``mlps shards --image-format`` offers.

    png    lossless, the default; source PNGs are copied bit for bit
    webp   lossless WebP: the same pixels, smaller and faster to decode than PNG
    jpeg   lossy JPEG (``--image-quality``, 4:4:4 chroma): decodes several times faster
           than PNG on the CPU, and on the GPU with DALI (nvJPEG, ``data.loader=dali``)

The choice applies to the training split, which is decoded every epoch; val and test keep
PNG so that metrics are computed on the original pixels. Masks are always PNG (class
indices must survive exactly). The member of a sample is named by its encoding
(``KEY.png``, ``KEY.webp`` or ``KEY.jpg``) and the split's ``image_format`` in info.json
says which; readers hand the bytes out as ``"image"`` whatever the encoding.
"""

from __future__ import annotations

import io

from PIL import Image

from mlps_dist.core import png

MEMBER_OF_FORMAT = {"png": "png", "webp": "webp", "jpeg": "jpg"}
IMAGE_FORMATS = tuple(MEMBER_OF_FORMAT)
DEFAULT_JPEG_QUALITY = 95


def image_member(image_format: str) -> str:
    if image_format not in MEMBER_OF_FORMAT:
        raise ValueError(f"image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    return MEMBER_OF_FORMAT[image_format]


def split_image_format(image_format: str, split: str) -> str:
    """The encoding ``split`` is stored in: the chosen one for train, PNG for val and test."""
    return image_format if split == "train" else "png"


def format_info(image_format: str, quality: int) -> dict:
    """A split's encoding as info.json records it (the quality only where it matters: JPEG)."""
    return {"image_format": image_format, **({"image_quality": quality} if image_format == "jpeg" else {})}


def encode_rgb(img: Image.Image, image_format: str, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """An RGB image as ``image_format`` bytes (``quality`` is used by jpeg only)."""
    if image_format == "png":
        return png.encode(img)
    buf = io.BytesIO()
    if image_format == "webp":
        # Low effort: encoding stays fast (a one-off per collection); decoding speed barely depends on it.
        img.save(buf, format="WEBP", lossless=True, quality=25, method=1)
    elif image_format == "jpeg":
        # 4:4:4: no chroma subsampling, which would blur the stain colours at cell edges.
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    else:
        image_member(image_format)  # raises with the list of formats
    return buf.getvalue()
