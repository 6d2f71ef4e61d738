"""Concept folders: ``<train_data_dir>/<N>_<name>/`` with images and same-stem caption files.

N is the folder's repeats: each image is seen N times per epoch, so iterations per epoch =
Σ repeats × images (the guide's ``1_nekochan`` 76 + ``6_maid`` 16 = 172).

Datasets scraped from the web hold every kind of bad file. The scan decides for each, before any model
work: a file that cannot train (truncated, corrupt, empty, unreadable, an unsupported type, a looping
symbolic link) is skipped and listed in ``skipped`` with what to do; what trains but not as the user may
think (a caption read with a fallback encoding, a caption without an image, images in a subfolder,
transparent images, an empty caption) becomes a ``warnings`` line that names the files; a layout that
cannot be what the user meant (a folder of images without a repeat count, no usable image at all) is
refused with :class:`DatasetError` saying what to fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS  # noqa: F401  (the supported types, for callers)

CONCEPT_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    concept: str          # the folder name, e.g. "6_maid"
    repeats: int
    caption: str          # the caption file's text, or the concept name when missing/empty
    caption_source: str   # "file", "missing" or "empty"
    size: Tuple[int, int]  # (width, height), upright (EXIF orientation applied)


@dataclass
class ConceptInfo:
    folder: str
    name: str
    repeats: int
    images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0
    path: Optional[Path] = None          # a subset's image_dir (concept folders: root / folder)
    caption_extension: str = ""          # a subset's own; "" = the dataset's
    caption_prefix: str = ""
    caption_suffix: str = ""


@dataclass
class DatasetScan:
    root: Path
    items: List[ImageItem]
    concepts: List[ConceptInfo]
    skipped: List[Tuple[Path, str]] = field(default_factory=list)   # (file relative to root, why + what to do)
    warnings: List[str] = field(default_factory=list)

    @property
    def iterations_per_epoch(self) -> int:
        return sum(c.repeats * c.images for c in self.concepts)

    def messages(self) -> List[str]:
        """Every warning about the dataset, worded as a training run reports them."""
        return self.warnings + [f"skipped {p}: {why}" for p, why in self.skipped]

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
    from .scanner import Scanner
    scan = Scanner(root, caption_extension).run()
    _warn_small(scan, min_side)
    return scan


def scan_subsets(subsets, min_side: int = 0) -> DatasetScan:
    """Scan sd-scripts-style subsets (:class:`~.dataset_config.Subset`: a folder, its repeats, fallback caption
    and caption extension) into the same :class:`DatasetScan` as concept folders, with the same checks.
    A subset's folder needs no ``N_`` prefix; one that is missing or holds no usable image is refused."""
    import os
    from .scanner import Scanner
    dirs = [Path(s.image_dir) for s in subsets]
    problems = []
    for d in dirs:
        if not d.exists():
            problems.append(f"image_dir {str(d)!r} does not exist: fix the path (relative paths are read from the "
                            "folder the trainer runs in), or remove the subset.")
        elif not d.is_dir():
            problems.append(f"image_dir {str(d)!r} is a file: point it at the folder that holds the images.")
    if problems:
        raise DatasetError("Subsets that cannot be read:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        root = Path(os.path.commonpath([str(d.resolve().parent) for d in dirs]))
    except ValueError:   # different drives
        root = Path(dirs[0].resolve().anchor)
    seen: Dict[str, int] = {}
    infos = []
    for s, d in zip(subsets, dirs):
        name = d.resolve().name or str(d)
        seen[name] = seen.get(name, 0) + 1
        folder = name if seen[name] == 1 else f"{name} ({seen[name]})"   # ss_dataset_dirs keys stay distinct
        infos.append(ConceptInfo(folder=folder, name=s.fallback_caption or name, repeats=s.repeats, path=d,
                                 caption_extension=s.caption_extension, caption_prefix=s.caption_prefix,
                                 caption_suffix=s.caption_suffix))
    scan = Scanner(root, ".txt", subsets=True).run_subsets(infos)
    _warn_small(scan, min_side)
    return scan


def _warn_small(scan: DatasetScan, min_side: int) -> None:
    if min_side:
        small = [it for it in scan.items if min(it.size) < min_side]
        if small:
            scan.warnings.append(
                f"{len(small)} images are smaller than the smallest bucket ({min_side}px), e.g. {small[0].path.name} "
                f"{small[0].size[0]}x{small[0].size[1]}: they will be upscaled and look soft. Use larger images or "
                "lower min_bucket_reso/resolution.")


def tag_frequency(items: List[ImageItem]) -> Dict[str, Dict[str, int]]:
    """``{folder: {tag: images with that tag}}``, as kohya's ``ss_tag_frequency``."""
    out: Dict[str, Dict[str, int]] = {}
    for it in items:
        d = out.setdefault(it.concept, {})
        for tag in {t.strip() for t in it.caption.split(",") if t.strip()}:
            d[tag] = d.get(tag, 0) + 1
    return out
