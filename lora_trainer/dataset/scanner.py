"""How a dataset folder becomes a :class:`DatasetScan`: the walk over concept folders and the wording of
what it finds (see folders.py for the decisions). Every message names the files and says what to do."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import DatasetError
from .captions import FALLBACK_ENCODINGS, read_caption_file
from .folders import CONCEPT_RE, ConceptInfo, DatasetScan, ImageItem
from .images import (IMAGE_EXTENSIONS, LARGE_PIXELS, SUPPORTED_TEXT, UNSUPPORTED_EXTENSIONS, BadImage, extension,
                     inspect_image, os_error_why, unsupported_why)

LISTED = 10   # files named in one warning; the rest are counted


def count(n: int, noun: str) -> str:
    """``count(1, "image")`` -> "1 image", ``count(2, "image")`` -> "2 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def listing(names: List[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def folder_name_problem(name: str) -> Optional[str]:
    """None for a good concept folder name, else what is wrong and the name to use."""
    m = re.match(r"^(\d+)_(.*)$", name)
    if m:
        if not m[2].strip():
            return (f"{name}: no name after the repeats: rename it to {m[1]}_<name>, e.g. {m[1]}_mychar (the name "
                    "is the caption of images without a caption file)")
        if int(m[1]) < 1:
            return f"{name}: 0 repeats, so its images would never train: rename it to 1_{m[2]} (or more repeats)"
        return None
    m = re.match(r"^(\d+)[\s.\-]+(\S.*)$", name)
    if m:
        return f"{name}: the repeats and the name must be joined by '_': rename it to {m[1]}_{m[2]}"
    if name.startswith("_"):
        return f"{name}: no repeat count before the '_': rename it to 10{name} (10 repeats)"
    return f"{name}: no repeat count: rename it to 10_{name} (10 repeats)"


def _be(n, one: str = "is", many: str = "are") -> str:
    return one if (n if isinstance(n, int) else len(n)) == 1 else many


def _do(n) -> str:
    return _be(n, "does", "do")


def _entries(folder: Path) -> List[Path]:
    return sorted(folder.iterdir())


def _image_like(p: Path) -> bool:
    return extension(p) in IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS


def _broken_link(p: Path) -> bool:
    """A symbolic link that loops or points at nothing (``exists()`` is False for both)."""
    return p.is_symlink() and not p.exists()


def _link_why(p: Path) -> str:
    try:
        os.stat(p)
    except OSError as e:
        return os_error_why(e, p)
    return "a symbolic link that cannot be followed: replace it with the file or folder itself"


def _holds_images(folder: Path) -> bool:
    try:
        return any(_image_like(p) and not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


def _count_images(folder: Path, cap: int = 100_000) -> int:
    """Images anywhere under ``folder``; symbolic links to folders are not followed (no loops)."""
    n = 0
    for _, _, files in os.walk(folder, followlinks=False):
        n += sum(1 for f in files if extension(Path(f)) in IMAGE_EXTENSIONS and not f.startswith("."))
        if n >= cap:
            break
    return n


class Scanner:
    def __init__(self, root: Path, caption_extension: str, subsets: bool = False):
        self.root = root
        self.subsets = subsets    # scanning dataset-config subsets (any folder name) rather than N_name folders
        self.ext = caption_extension.lower()
        self.scan = DatasetScan(root=root, items=[], concepts=[])
        self.encodings: Dict[str, List[Tuple[str, str]]] = {}   # encoding -> [(caption file, text)]
        self.orphans: List[str] = []
        self.transparent: List[str] = []
        self.animated: List[str] = []
        self.large: List[Tuple[str, Tuple[int, int]]] = []
        self.nested = 0
        self.empty: Dict[str, List[str]] = {}     # folder -> empty caption files

    def rel(self, p: Path) -> Path:
        try:
            return p.relative_to(self.root)
        except ValueError:
            return p

    def skip(self, p: Path, why: str) -> None:
        self.scan.skipped.append((self.rel(p), why))

    # ------------------------------------------------------------ the top level
    def concept_folders(self) -> List[Path]:
        root, warnings = self.root, self.scan.warnings
        try:
            entries = _entries(root)
        except OSError as e:
            raise DatasetError(f"train_data_dir {str(root)!r} cannot be read ({e.strerror}): give your user read "
                               "access to it.") from None
        good, refused, ignored, loose = [], [], [], []
        for p in entries:
            if p.name.startswith("."):
                continue
            if _broken_link(p):
                warnings.append(f"{p.name} is ignored: it is a symbolic link that loops back on itself or points "
                                "to nothing; remove it, or point it at a folder.")
            elif p.is_dir():
                problem = folder_name_problem(p.name)
                if problem is None:
                    good.append(p)
                elif _holds_images(p):
                    refused.append(problem)
                else:
                    ignored.append(p.name)
            elif p.is_file() and _image_like(p):
                loose.append(p.name)
        if refused:
            raise DatasetError("These folders hold images but are not named N_name (N = repeats, at least 1):\n"
                               + "\n".join(f"  - {r}" for r in refused)
                               + "\nRename them as shown, or move them out of train_data_dir.")
        if not good:
            named = (f" {listing(ignored)} {'is' if len(ignored) == 1 else 'are'} not named N_name (N = repeats) "
                     "and hold no images." if ignored else "")
            hint = (f" It holds {len(loose)} images directly: move them into a folder such as "
                    f"{root / '10_mychar'}." if loose else "")
            raise DatasetError(f"{root} has no concept folders. Put your images in a folder named N_name inside it, "
                               f"where N is the repeats (e.g. 10_mychar).{named}{hint}")
        if ignored:
            warnings.append(f"Folders not named N_name (N = repeats) hold no images and are ignored: "
                            f"{listing(ignored)}.")
        if loose:
            warnings.append(f"{count(len(loose), 'image')} directly in train_data_dir {_do(loose)} not train "
                            f"({listing(loose)}): only images inside a concept folder (N_name) train; move them into "
                            "one.")
        return good

    # ------------------------------------------------------------ one concept folder
    def concept(self, d: Path, info: Optional[ConceptInfo] = None) -> ConceptInfo:
        if info is None:
            m = CONCEPT_RE.match(d.name)
            info = ConceptInfo(folder=d.name, name=m[2], repeats=int(m[1]))
        cap_ext = (info.caption_extension or self.ext).lower()
        try:
            entries = _entries(d)
        except OSError as e:
            self.scan.warnings.append(f"{d.name} is ignored: it cannot be listed ({e.strerror}): give your user "
                                      "read access to it (chmod a+rx).")
            return info
        images, captions, stems = [], {}, set()
        for p in entries:
            hidden = p.name.startswith(".")
            if hidden and not (extension(p) == p.name.lower() and _image_like(p)):
                continue   # .DS_Store, ._name.png (macOS metadata), the latent cache
            if _broken_link(p):
                if _image_like(p):
                    self.skip(p, _link_why(p))
                    stems.add(p.stem.lower())
                continue
            if p.is_dir():
                self.subfolder(d, p)
                continue
            if not p.is_file():
                continue
            ext = extension(p)
            if ext == cap_ext and not hidden:
                captions[p.stem] = p
            elif ext in IMAGE_EXTENSIONS:
                images.append(p)
            elif ext in UNSUPPORTED_EXTENSIONS:
                self.skip(p, unsupported_why(p))
                stems.add(p.stem.lower())
        used: set = set()
        for p in images:
            self.image(p, info, captions, used)
            stems.add(p.stem.lower())
        self.orphans += [str(self.rel(c)) for s, c in sorted(captions.items())
                         if s not in used and s.lower() not in stems]
        self.caption_warnings(info)
        if info.images == 0 and not self.subsets:
            self.scan.warnings.append(f"{d.name} has no usable images ({SUPPORTED_TEXT}); it is ignored.")
        return info

    def subfolder(self, d: Path, sub: Path) -> None:
        rel = self.rel(sub)
        if sub.is_symlink():
            target, here = Path(os.path.realpath(sub)), Path(os.path.realpath(d))
            if target == here or target in here.parents:
                self.scan.warnings.append(f"{rel} is a symbolic link back to a folder that contains it (a loop); "
                                          "it is ignored: remove it.")
                return
        n = _count_images(sub)
        if n and self.subsets:
            self.nested += n
            self.scan.warnings.append(
                f"{rel} holds {count(n, 'image')} that {_do(n)} not train: only images directly inside a subset's "
                f"image_dir train. Move them up into {d.name}, or add the subfolder as a subset of its own.")
        elif n:
            self.nested += n
            self.scan.warnings.append(
                f"{rel} holds {count(n, 'image')} that {_do(n)} not train: only images directly inside a concept "
                f"folder train. "
                f"Move them up into {d.name}, or make it a concept folder of its own in train_data_dir "
                f"(e.g. {d.name.split('_', 1)[0]}_{sub.name}).")

    def image(self, p: Path, info: ConceptInfo, captions: Dict[str, Path], used: set) -> None:
        try:
            im = inspect_image(p)
        except BadImage as e:
            self.skip(p, e.why)
            return
        if p.name.startswith("."):
            self.skip(p, f"the name is only an extension (a hidden file): rename it, e.g. image{extension(p)}")
            return
        rel = str(self.rel(p))
        if im.transparent:
            self.transparent.append(rel)
        if im.frames > 1:
            self.animated.append(f"{rel} ({im.frames} frames)")
        if im.size[0] * im.size[1] > LARGE_PIXELS:
            self.large.append((rel, im.size))
        cap_file = captions.get(p.stem) or next((c for s, c in captions.items() if s.lower() == p.stem.lower()), None)
        source, cap = "missing", info.name
        if cap_file is not None:
            used.add(cap_file.stem)
            try:
                text = read_caption_file(cap_file)
            except OSError as e:
                self.scan.warnings.append(f"caption file {self.rel(cap_file)} {os_error_why(e, cap_file)}; until "
                                          f"then its image trains with the caption '{info.name}'.")
                text = None
            if text is not None:
                if text.encoding in FALLBACK_ENCODINGS:
                    self.encodings.setdefault(text.encoding, []).append((str(self.rel(cap_file)), text.text))
                source, cap = ("file", text.text) if text.text else ("empty", info.name)
        if info.caption_prefix:   # as sd-scripts: prefix + " " + caption + " " + suffix, before shuffling
            cap = f"{info.caption_prefix} {cap}"
        if info.caption_suffix:
            cap = f"{cap} {info.caption_suffix}"
        if source == "missing":
            info.missing_captions += 1
        elif source == "empty":
            info.empty_captions += 1
            self.empty.setdefault(info.folder, []).append(str(self.rel(cap_file)))
        self.scan.items.append(ImageItem(p, info.folder, info.repeats, cap, source, im.size))
        info.images += 1

    def caption_warnings(self, info: ConceptInfo) -> None:
        w = self.scan.warnings
        if info.missing_captions:
            w.append(f"{info.folder}: {info.missing_captions} of {info.images} images have no caption file and "
                     f"train with the caption '{info.name}'.")
        empty = self.empty.get(info.folder, [])
        if empty:
            w.append(f"{info.folder}: {len(empty)} of {info.images} images have an empty (or whitespace-only) caption "
                     f"file ({listing(empty)}) and train with the caption '{info.name}': write their captions, or "
                     "delete the files.")

    # ------------------------------------------------------------ the whole dataset
    def run(self) -> DatasetScan:
        for d in self.concept_folders():
            self.scan.concepts.append(self.concept(d))
        return self.finish()

    def run_subsets(self, infos: List[ConceptInfo]) -> DatasetScan:
        """Scan each subset's folder as a concept folder; a subset without a usable image is refused."""
        empty = []
        for info in infos:
            self.concept(info.path, info)
            self.scan.concepts.append(info)
            if not info.images:
                bad = [f"{p.name}: {why}" for p, why in self.scan.skipped
                       if Path(self.root, p).parent.resolve() == Path(info.path).resolve()]
                empty.append(f"{info.path}: no usable images ({SUPPORTED_TEXT})"
                             + (f"; skipped: {'; '.join(bad[:LISTED])}" if bad else ""))
        if empty:
            raise DatasetError("These subsets hold no image that can train:\n" + "\n".join(f"  - {e}" for e in empty)
                               + "\nAdd images (or fix the skipped files), correct image_dir, or remove the subset.")
        return self.finish()

    def finish(self) -> DatasetScan:
        scan = self.scan
        w = scan.warnings
        for enc, files in self.encodings.items():
            name, (first, text) = FALLBACK_ENCODINGS[enc], files[0]
            w.append(f"{count(len(files), 'caption file')} {_be(files)} not UTF-8 and {_be(files, 'was', 'were')} "
                     f"read as {name} (e.g. {first}: "
                     f"'{text[:60]}'): check that the text is right, and re-save {_be(files, 'it', 'them')} as UTF-8: "
                     f"{listing([f for f, _ in files])}.")
        if self.orphans:
            w.append(f"{count(len(self.orphans), 'caption file')} without an image of the same name "
                     f"({_be(self.orphans, 'it is', 'they are')} not used): {listing(self.orphans)}. Give each the "
                     f"name of its image (001.png + 001{self.ext if not self.subsets else '<caption_extension>'}), "
                     "or remove it.")
        if self.transparent:
            w.append(f"{count(len(self.transparent), 'image')} with transparent areas, which train as white: "
                     f"{listing(self.transparent)}. If another background suits them, flatten them yourself.")
        if self.animated:
            w.append(f"{count(len(self.animated), 'animated image')}, of which only the first frame trains: "
                     f"{listing(self.animated)}. Save the frame you want as a still image.")
        if self.large:
            (first, (lw, lh)) = self.large[0]
            they = _be(self.large, "it trains", "they train")
            w.append(f"{count(len(self.large), 'very large image')} (e.g. {first} {lw}x{lh}): {they} "
                     "downscaled to the bucket, but decoding such images makes the dataset check and latent caching "
                     f"slow; downscale to about 2048 px on the long side: {listing([f for f, _ in self.large])}.")
        scan.concepts = [c for c in scan.concepts if c.images]
        if not scan.items:
            raise DatasetError(self.nothing_usable())
        return scan

    def nothing_usable(self) -> str:
        scan = self.scan
        msg = f"No usable images in {self.root}'s concept folders ({SUPPORTED_TEXT})."
        if scan.skipped:
            msg += f" {len(scan.skipped)} files were skipped:\n" + "\n".join(
                f"  - {p}: {why}" for p, why in scan.skipped[:LISTED])
            if len(scan.skipped) > LISTED:
                msg += f"\n  - and {len(scan.skipped) - LISTED} more"
            msg += "\n"
        else:
            msg += " "
        if self.nested:
            msg += (f"{count(self.nested, 'image')} {_be(self.nested, 'sits', 'sit')} in subfolders of concept "
                    "folders, where images do not train: move them up into the concept folder. ")
        return msg + ("Add images, or fix the listed files." if scan.skipped else "Add images.")


