"""Aspect-ratio buckets: every image trains at the bucket whose shape is closest to its own, with an
area no larger than the training resolution's; the image is scaled to cover the bucket, then centre-cropped."""
from __future__ import annotations

import math
from typing import List, Tuple

Size = Tuple[int, int]


def make_buckets(resolution: Size, min_reso: int, max_reso: int, step: int) -> List[Size]:
    max_area = resolution[0] * resolution[1]
    out = set()
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso:
            out.add((w, h))
            out.add((h, w))
        w += step
    side = int(math.sqrt(max_area)) // step * step
    if min_reso <= side <= max_reso:
        out.add((side, side))
    if not out:
        out.add((resolution[0] // step * step or step, resolution[1] // step * step or step))
    return sorted(out)


def choose_bucket(size: Size, buckets: List[Size], no_upscale: bool = False) -> Size:
    w, h = size
    ar = math.log(w / h)
    cands = buckets
    if no_upscale:
        fit = [b for b in buckets if b[0] * b[1] <= w * h]
        cands = fit or [min(buckets, key=lambda b: b[0] * b[1])]
    # closest aspect ratio, then the largest area among equally close ones
    return min(cands, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 6), -b[0] * b[1]))


def resize_and_crop(size: Size, bucket: Size) -> Tuple[int, int, int, int]:
    """(resized width, height, crop left, top): the image is scaled to cover ``bucket``, then centre-cropped."""
    w, h = size
    bw, bh = bucket
    s = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
    return nw, nh, (nw - bw) // 2, (nh - bh) // 2


def size_conditioning(size: Size, bucket: Size) -> Tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning for an image trained at ``bucket``, as sd-scripts computes it:
    (original height, width, crop top, crop left (in the resized image), target height, width)."""
    _, _, left, top = resize_and_crop(size, bucket)
    return size[1], size[0], top, left, bucket[1], bucket[0]


def load_resized(path, bucket: Size):
    """The image as a (3,H,W) float tensor in [-1,1], upright (EXIF orientation), as 8-bit RGB (CMYK, palette
    and 16-bit images converted, transparency on white), scaled to cover ``bucket`` and centre-cropped.

    A file that no longer decodes (changed since the dataset was scanned) raises :class:`DatasetError`
    naming it, never Pillow's own error."""
    import numpy as np
    import torch
    from PIL import Image
    from ..errors import DatasetError
    from .images import BadImage, open_rgb
    bw, bh = bucket
    try:
        im = open_rgb(path)
    except BadImage as e:
        raise DatasetError(f"{path} cannot be loaded for training: {e.why}. It passed the dataset check, so it "
                           "changed since; fix or remove it and start the run again.") from None
    nw, nh, left, top = resize_and_crop(im.size, bucket)
    downscale = max(bw / im.size[0], bh / im.size[1]) < 1
    # reducing_gap: a very large photo is first reduced by an integer factor (same result, far faster)
    im = im.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0) if downscale else im.resize((nw, nh), Image.BICUBIC)
    im = im.crop((left, top, left + bw, top + bh))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
