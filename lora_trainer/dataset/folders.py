"""Concept folders: ``<train_data_dir>/<N>_<name>/`` with images and same-stem caption files.

N is the folder's repeats: each image is seen N times per epoch, so iterations per epoch =
Σ repeats × images (the guide's ``1_nekochan`` 76 + ``6_maid`` 16 = 172).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONCEPT_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    concept: str          # the folder name, e.g. "6_maid"
    repeats: int
    caption: str          # the caption file's text, or the concept name when missing/empty
    caption_source: str   # "file", "missing" or "empty"
    size: Tuple[int, int]  # (width, height)


@dataclass
class ConceptInfo:
    folder: str
    name: str
    repeats: int
    images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0


@dataclass
class DatasetScan:
    root: Path
    items: List[ImageItem]
    concepts: List[ConceptInfo]
    skipped: List[Tuple[Path, str]] = field(default_factory=list)   # (file, why)
    warnings: List[str] = field(default_factory=list)

    @property
    def iterations_per_epoch(self) -> int:
        return sum(c.repeats * c.images for c in self.concepts)

    def summary_lines(self) -> List[str]:
        lines = [f"{c.folder}: {c.images} images x {c.repeats} repeats = {c.images * c.repeats}"
                 + (f", {c.missing_captions} without caption (using '{c.name}')" if c.missing_captions else "")
                 + (f", {c.empty_captions} empty captions (using '{c.name}')" if c.empty_captions else "")
                 for c in self.concepts]
        lines.append(f"iterations per epoch: {self.iterations_per_epoch}")
        for p, why in self.skipped:
            lines.append(f"skipped {p}: {why}")
        lines += self.warnings
        return lines


def _read_caption(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "utf-16", "cp1251", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    return " ".join(line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip())


def _image_size(path: Path) -> Tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        im.verify()  # catches truncated / corrupt files without decoding all pixels
    with Image.open(path) as im:
        return im.size


def scan_dataset(root, caption_extension: str = ".txt", min_side: int = 0) -> DatasetScan:
    """Scan the dataset folder. Raises :class:`DatasetError` with the fix for unusable layouts."""
    root = Path(root) if root else Path("")
    if not str(root) or not root.exists():
        raise DatasetError(f"train_data_dir {str(root)!r} does not exist: point it at the folder that holds "
                           "your concept folders (e.g. dataset/ containing 10_mychar/).")
    if not root.is_dir():
        raise DatasetError(f"train_data_dir {str(root)!r} is a file: point it at the folder that holds "
                           "your concept folders.")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = [p.name for p in subdirs if not CONCEPT_RE.match(p.name) or int(CONCEPT_RE.match(p.name)[1]) < 1]
    loose_images = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not subdirs:
        hint = f" It holds {len(loose_images)} images directly: move them into a folder such as " \
               f"{root / '10_mychar'}." if loose_images else ""
        raise DatasetError(f"{root} has no concept folders. Put your images in a folder named N_name inside it, "
                           f"where N is the repeats (e.g. 10_mychar).{hint}")
    if bad:
        raise DatasetError(
            "These folders are not named N_name (N = repeats, at least 1): " + ", ".join(bad) +
            f". Rename them, e.g. {bad[0]} -> 10_{bad[0].split('_', 1)[-1] if '_' in bad[0] else bad[0]}, "
            "or move them out of train_data_dir.")
    scan = DatasetScan(root=root, items=[], concepts=[])
    for d in subdirs:
        m = CONCEPT_RE.match(d.name)
        info = ConceptInfo(folder=d.name, name=m[2], repeats=int(m[1]))
        for p in sorted(d.iterdir()):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if p.stat().st_size == 0:
                scan.skipped.append((p, "empty file (0 bytes)"))
                continue
            try:
                size = _image_size(p)
            except Exception as e:  # PIL raises many types for bad files
                scan.skipped.append((p, f"not a readable image ({type(e).__name__})"))
                continue
            cap = _read_caption(p.with_suffix(caption_extension))
            source = "file"
            if cap is None:
                source, cap = "missing", info.name
                info.missing_captions += 1
            elif not cap:
                source, cap = "empty", info.name
                info.empty_captions += 1
            scan.items.append(ImageItem(p, d.name, info.repeats, cap, source, size))
            info.images += 1
        if info.images == 0:
            scan.warnings.append(f"{d.name} has no usable images (png, jpg, jpeg, webp, bmp); it is ignored.")
        scan.concepts.append(info)
    scan.concepts = [c for c in scan.concepts if c.images]
    if not scan.items:
        skipped = f" {len(scan.skipped)} files were skipped as unreadable." if scan.skipped else ""
        raise DatasetError(f"No usable images in {root}'s concept folders (png, jpg, jpeg, webp, bmp).{skipped}"
                           " Add images, or fix the listed files.")
    if min_side:
        small = [it for it in scan.items if min(it.size) < min_side]
        if small:
            scan.warnings.append(
                f"{len(small)} images are smaller than the smallest bucket ({min_side}px), e.g. {small[0].path.name} "
                f"{small[0].size[0]}x{small[0].size[1]}: they will be upscaled and look soft. Use larger images or "
                "lower min_bucket_reso/resolution.")
    return scan


def tag_frequency(items: List[ImageItem]) -> Dict[str, Dict[str, int]]:
    """``{folder: {tag: images with that tag}}``, as kohya's ``ss_tag_frequency``."""
    out: Dict[str, Dict[str, int]] = {}
    for it in items:
        d = out.setdefault(it.concept, {})
        for tag in {t.strip() for t in it.caption.split(",") if t.strip()}:
            d[tag] = d.get(tag, 0) + 1
    return out
