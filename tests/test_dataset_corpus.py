"""Issue 10, item 3: a corpus of the bad datasets users bring from the web.

Each case is a small dataset with one problem. Either it trains around the problem and says so (the
dataset doctor's warnings and the run's ``result.warnings`` hold the same line, naming the files), or
converts the image the way the user sees it (no message), or is refused before any model work with a
message saying what to fix (the doctor's ``error``, the run's ``UserError``). Never a traceback, never a
raw exception text.
"""
from __future__ import annotations

import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset.buckets import load_resized
from lora_trainer.dataset.folders import scan_dataset
from lora_trainer.doctor import diagnose
from lora_trainer.errors import UserError
from lora_trainer.run import build_data, train

RED, BLUE = (220, 30, 30), (30, 40, 220)


# ------------------------------------------------------------------ files of each kind
def png(path: Path, size=(64, 64), colour=RED, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def caption(path: Path, text: str, encoding="utf-8") -> None:
    path.write_bytes(text.encode(encoding))


def jpeg_bytes(size=(256, 192)) -> bytes:
    im = Image.radial_gradient("L").resize(size).convert("RGB")
    b = io.BytesIO()
    im.save(b, "JPEG", quality=92)
    return b.getvalue()


def truncated_jpeg(path: Path) -> None:
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])


def cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path)   # pure red in print colours


def png16(path: Path) -> None:
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(path)   # mid grey, 16 bits


def rgb48_png(path: Path) -> None:
    """16 bits per channel RGB (Pillow cannot write it): every pixel (0x8000, 0x4000, 0xFFFF)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF) * 64
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * 64)) + chunk(b"IEND", b""))


def palette_png(path: Path, transparent=False) -> None:
    im = Image.new("P", (64, 64), 1)
    im.putpalette([255, 255, 255] + list(BLUE) + [0] * 762)
    im.paste(0, (0, 0, 32, 64))
    im.save(path, **({"transparency": 0} if transparent else {}))


def rgba_png(path: Path, mode="RGBA") -> None:
    colour = (30, 0) if mode == "LA" else (30, 40, 220, 0)
    im = Image.new(mode, (64, 64), colour)          # transparent everywhere but ...
    im.paste((30, 255) if mode == "LA" else (30, 40, 220, 255), (0, 0, 32, 64))   # ... the left half
    im.save(path)


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 128x64 (left half red, right half blue) with orientation 6: shown upright as 64x128, red on top."""
    im = Image.new("RGB", (128, 64), BLUE)
    im.paste(RED, (0, 0, 64, 64))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, quality=95, exif=exif.tobytes())


def animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.fixture(scope="session")
def big_png(tmp_path_factory) -> Path:
    """8000x6000, solid: about 150 KB on disk (made once)."""
    return png(tmp_path_factory.mktemp("big") / "big.png", (8000, 6000), (90, 140, 60))


# ------------------------------------------------------------------ the corpus
@dataclass
class Case:
    id: str
    build: Callable[[Path], None]   # gets the dataset root; 2_good/good.png (+ caption) is already there
    outcome: str                    # "warn": trains, the message among the warnings; "quiet": trains, no message
    #                                 naming ``quiet``; "refuse": refused with the message
    message: Optional[str] = None   # regex the doctor's and the run's message must match
    quiet: str = ""                 # for "quiet": a file no message may name
    check: Optional[Callable] = None   # extra checks on the scan
    good: bool = True               # build the good folder first


def _in_good(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda root: make(root / "2_good" / name)


def _caption_case(name: str, data: bytes) -> Callable[[Path], None]:
    def build(root):
        png(root / "2_good" / f"{name}.png", colour=BLUE)
        (root / "2_good" / f"{name}.txt").write_bytes(data)
    return build


def _item(scan, name):
    return next(it for it in scan.items if it.path.name == name)


def _symlink_loop(root):
    d = root / "2_good"
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")


def _unreadable_caption(root):
    png(root / "2_good" / "shut.png", colour=BLUE)
    caption(root / "2_good" / "shut.txt", "shut, tag")
    os.chmod(root / "2_good" / "shut.txt", 0)
    _skip_if_still_readable(root / "2_good" / "shut.txt")


def _skip_if_still_readable(p: Path) -> None:
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        return
    pytest.skip("running as root: a chmod 000 file stays readable, so the permission case cannot be built")


def _self_loop_folder(root):
    os.symlink("3_loop", root / "3_loop")


def _nested(root):
    png(root / "2_good" / "more" / "n1.png")
    png(root / "2_good" / "more" / "deeper" / "n2.png")


def _all_nested(root):
    png(root / "2_only" / "sub" / "n1.png")


def _unreadable(root):
    p = png(root / "2_good" / "locked.png")
    os.chmod(p, 0)
    _skip_if_still_readable(p)


CASES = [
    # ---- images that cannot train: skipped, named, with what to do
    Case("corrupt", _in_good("corrupt.png", lambda p: p.write_bytes(os.urandom(3000))), "warn",
         r"^skipped 2_good/corrupt\.png: not an image \(its content is not png, jpg, jpeg, webp, bmp data.*download it "
         r"again, or remove it$"),
    Case("web-page-as-png", _in_good("page.png", lambda p: p.write_text("<!DOCTYPE html><html>403</html>")), "warn",
         r"^skipped 2_good/page\.png: not an image but a web page \(HTML/XML\) saved under an image name"),
    Case("truncated-jpeg", _in_good("half.jpg", truncated_jpeg), "warn",
         r"^skipped 2_good/half\.jpg: truncated: the file ends before the image does \(an interrupted download or "
         r"copy\): download it again, or remove it$"),
    Case("zero-bytes", _in_good("zero.png", lambda p: p.write_bytes(b"")), "warn",
         r"^skipped 2_good/zero\.png: empty file \(0 bytes\): download it again or remove it$"),
    Case("dot-png-not-an-image", _in_good(".png", lambda p: p.write_text("hello")), "warn",
         r"^skipped 2_good/\.png: not an image"),
    Case("unreadable", _unreadable, "warn",
         r"^skipped 2_good/locked\.png: cannot be read \(permission denied\): give your user read access"),
    Case("symlink-loop-file", _symlink_loop, "warn",
         r"^skipped 2_good/loop_a\.png: a symbolic link that loops back on itself: replace it with the image file"),
    Case("dangling-symlink", lambda root: os.symlink("gone.png", root / "2_good" / "link.png"), "warn",
         r"^skipped 2_good/link\.png: a symbolic link to a missing file \(gone\.png\): replace it with the image file"),
    Case("animated-gif", _in_good("anim.gif", animated_gif), "warn",
         r"^skipped 2_good/anim\.gif: an animated GIF \(3 frames\): GIF is not a training format \(png, jpg, jpeg, "
         r"webp, bmp\): save the frame you want as PNG, or remove it$"),
    Case("tiff", _in_good("scan.tiff", lambda p: png(p, colour=BLUE)), "warn",
         r"^skipped 2_good/scan\.tiff: \.tiff is not a training format .*: convert it to PNG or JPEG, or remove it$"),
    Case("jfif", _in_good("photo.jfif", lambda p: p.write_bytes(jpeg_bytes())), "warn",
         r"^skipped 2_good/photo\.jfif: .*but it is a JPEG: rename it to \.jpg$"),
    # ---- images that train, converted as the user sees them
    Case("cmyk", _in_good("cmyk.jpg", cmyk_jpeg), "quiet", quiet="cmyk.jpg",
         check=lambda scan: _item(scan, "cmyk.jpg")),
    Case("16-bit", _in_good("grey16.png", png16), "quiet", quiet="grey16.png",
         check=lambda scan: _item(scan, "grey16.png")),
    Case("16-bit-rgb", _in_good("rgb48.png", rgb48_png), "quiet", quiet="rgb48.png",
         check=lambda scan: _item(scan, "rgb48.png")),
    Case("palette", _in_good("pal.png", palette_png), "quiet", quiet="pal.png",
         check=lambda scan: _item(scan, "pal.png")),
    Case("palette-transparent", _in_good("paltr.png", lambda p: palette_png(p, True)), "warn",
         r"^1 image with transparent areas, which train as white: 2_good/paltr\.png\. If another background"),
    Case("rgba", _in_good("alpha.png", rgba_png), "warn",
         r"^1 image with transparent areas, which train as white: 2_good/alpha\.png\."),
    Case("la", _in_good("grey_alpha.png", lambda p: rgba_png(p, "LA")), "warn",
         r"^1 image with transparent areas, which train as white: 2_good/grey_alpha\.png\."),
    Case("animated-png", _in_good("apng.png", lambda p: animated_gif(p)), "warn",   # saved as APNG by its name
         r"^1 animated image, of which only the first frame trains: 2_good/apng\.png \(3 frames\)\. Save the frame "
         r"you want as a still image\.$"),
    Case("exif-rotated", _in_good("turned.jpg", exif_rotated_jpeg), "quiet", quiet="turned.jpg",
         check=lambda scan: _item(scan, "turned.jpg").size == (64, 128)),
    Case("very-large", None, "warn",   # build set in the test (uses the session's big PNG)
         r"^1 very large image \(e\.g\. 2_good/big\.png 8000x6000\): it trains downscaled to the bucket.*downscale "
         r"to about 2048 px on the long side", check=lambda scan: _item(scan, "big.png").size == (8000, 6000)),
    # ---- captions
    Case("cp1251-caption", _caption_case("ru", "кошка, сидит на окне".encode("cp1251")), "warn",
         r"^1 caption file is not UTF-8 and was read as Windows-1251 \(Cyrillic\) \(e\.g\. 2_good/ru\.txt: "
         r"'кошка, сидит на окне'\): check that the text is right, and re-save it as UTF-8: "
         r"2_good/ru\.txt\.$",
         check=lambda scan: _item(scan, "ru.png").caption == "кошка, сидит на окне"),
    Case("utf8-bom-caption", _caption_case("bom", b"\xef\xbb\xbfbom tag, blue"), "quiet", quiet="bom.txt",
         check=lambda scan: _item(scan, "bom.png").caption == "bom tag, blue"),
    Case("utf16-caption", _caption_case("wide", "wide tag, blue".encode("utf-16")), "quiet", quiet="wide.txt",
         check=lambda scan: _item(scan, "wide.png").caption == "wide tag, blue"),
    Case("empty-caption", _caption_case("e", b""), "warn",
         r"^2_good: 1 of 2 images have an empty \(or whitespace-only\) caption file \(2_good/e\.txt\) and train with "
         r"the caption 'good': write their captions, or delete the files\.$"),
    Case("whitespace-caption", _caption_case("ws", b"  \r\n\t \n"), "warn",
         r"^2_good: 1 of 2 images have an empty \(or whitespace-only\) caption file \(2_good/ws\.txt\)"),
    Case("unreadable-caption", _unreadable_caption, "warn",
         r"^caption file 2_good/shut\.txt cannot be read \(permission denied\): .*; until then its image trains with "
         r"the caption 'good'\.$"),
    Case("missing-caption", _in_good("nocap.png", png), "warn",
         r"^2_good: 1 of 2 images have no caption file and train with the caption 'good'\.$"),
    Case("caption-without-image", lambda root: caption(root / "2_good" / "lonely.txt", "lonely, tag"), "warn",
         r"^1 caption file without an image of the same name \(it is not used\): 2_good/lonely\.txt\. Give each the "
         r"name of its image \(001\.png \+ 001\.txt\), or remove it\.$"),
    # ---- folders
    Case("repeats-without-name", lambda root: png(root / "5_" / "a.png"), "refuse",
         r"not named N_name .*\n  - 5_: no name after the repeats: rename it to 5_<name>, e\.g\. 5_mychar"),
    Case("name-without-repeats", lambda root: png(root / "_name" / "a.png"), "refuse",
         r"\n  - _name: no repeat count before the '_': rename it to 10_name \(10 repeats\)"),
    Case("zero-repeats", lambda root: png(root / "0_name" / "a.png"), "refuse",
         r"\n  - 0_name: 0 repeats, so its images would never train: rename it to 1_name"),
    Case("no-repeat-count", lambda root: png(root / "abc" / "a.png"), "refuse",
         r"\n  - abc: no repeat count: rename it to 10_abc \(10 repeats\)\nRename them as shown, or move them out"),
    Case("space-instead-of-underscore", lambda root: png(root / "10 mychar" / "a.png"), "refuse",
         r"\n  - 10 mychar: the repeats and the name must be joined by '_': rename it to 10_mychar"),
    Case("spaces-in-name", lambda root: png(root / "3_my char" / "a.png", colour=BLUE), "warn",   # trains as named
         r"^3_my char: 1 of 1 images have no caption file and train with the caption 'my char'\.$",
         check=lambda scan: _item(scan, "a.png").caption == "my char"),
    Case("non-ascii-name", lambda root: png(root / "3_кошка ネコ" / "ü.png", colour=BLUE), "warn",
         r"^3_кошка ネコ: 1 of 1 images have no caption file and train with the caption 'кошка ネコ'\.$",
         check=lambda scan: _item(scan, "ü.png").caption == "кошка ネコ"),
    Case("empty-concept-folder", lambda root: (root / "4_empty").mkdir(), "warn",
         r"^4_empty has no usable images \(png, jpg, jpeg, webp, bmp\); it is ignored\.$"),
    Case("empty-misnamed-folder", lambda root: (root / "notes").mkdir(), "warn",
         r"^Folders not named N_name \(N = repeats\) hold no images and are ignored: notes\.$"),
    Case("nested-folder", _nested, "warn",
         r"^2_good/more holds 2 images that do not train: only images directly inside a concept folder train\. "
         r"Move them up into 2_good, or make it a concept folder of its own in train_data_dir \(e\.g\. 2_more\)\.$"),
    Case("symlink-loop-folder", lambda root: os.symlink("..", root / "2_good" / "up"), "warn",
         r"^2_good/up is a symbolic link back to a folder that contains it \(a loop\); it is ignored: remove it\.$"),
    Case("self-looping-concept-link", _self_loop_folder, "warn",
         r"^3_loop is ignored: it is a symbolic link that loops back on itself or points to nothing"),
    Case("loose-image-in-root", lambda root: png(root / "stray.png"), "warn",
         r"^1 image directly in train_data_dir does not train \(stray\.png\): only images inside a concept folder"),
    # ---- nothing usable at all: refused, the files listed
    Case("no-usable-image", lambda root: truncated_jpeg((root / "2_bad").mkdir() or root / "2_bad" / "half.jpg"),
         "refuse", r"^No usable images in .*'s concept folders \(png, jpg, jpeg, webp, bmp\)\. 1 files were skipped:\n"
         r"  - 2_bad/half\.jpg: truncated: the file ends before the image does", good=False),
    Case("only-nested-images", _all_nested, "refuse",
         r"^No usable images in .*\n?.*1 image sits in subfolders of concept folders, where images do not train",
         good=False),
    Case("only-bad-types", lambda root: animated_gif((root / "2_gifs").mkdir() or root / "2_gifs" / "a.gif"),
         "refuse", r"1 files were skipped:\n  - 2_gifs/a\.gif: an animated GIF \(3 frames\)", good=False),
]


def _build(case: Case, root: Path, big_png: Path) -> None:
    if case.good:
        png(root / "2_good" / "good.png")
        caption(root / "2_good" / "good.txt", "good, red")
    if case.id == "very-large":
        shutil.copyfile(big_png, root / "2_good" / "big.png")
    else:
        case.build(root)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_dataset_corpus(case, tmp_path, sd1_host, tiny_cfg, big_png):
    root = tmp_path / "ds"
    root.mkdir()
    _build(case, root, big_png)
    out = tmp_path / "run"
    cfg = tiny_cfg.replace(train_data_dir=str(root), output_dir=str(out), max_train_epochs=1, train_batch_size=1)
    report = diagnose(cfg)
    if case.outcome == "refuse":
        assert not report.ok and re.search(case.message, report.error), report.error
        with pytest.raises(UserError) as e:
            train(cfg, sd1_host)
        assert str(e.value) == report.error
        assert not out.exists()   # refused before any work: no folder made
        return
    assert report.ok, report.error
    if case.outcome == "warn":
        said = [w for w in report.warnings if re.search(case.message, w)]
        assert len(said) == 1, report.warnings
    else:
        said = [w for w in report.warnings if case.quiet in w]
        assert said == [], said
    if case.check is not None:
        assert case.check(build_data(cfg).scan) is not False
    result = train(cfg, sd1_host)
    assert result.final_file is not None and result.final_file.is_file()
    assert [w for w in result.warnings if w in said] == said   # the same words in the run as in the doctor
    if case.outcome == "quiet":
        assert not any(case.quiet in w for w in result.warnings), result.warnings


# ------------------------------------------------------------------ the pixels of converted images
def _mean_rgb(t, rows=slice(None), cols=slice(None)):
    return [round(float(v), 2) for v in ((t[:, rows, cols] + 1) * 127.5).mean(dim=(1, 2))]


def test_converted_images_load_as_the_user_sees_them(tmp_path):
    cmyk_jpeg(tmp_path / "cmyk.jpg")
    png16(tmp_path / "grey16.png")
    rgb48_png(tmp_path / "rgb48.png")
    palette_png(tmp_path / "pal.png")
    palette_png(tmp_path / "paltr.png", transparent=True)
    rgba_png(tmp_path / "alpha.png")
    rgba_png(tmp_path / "la.png", "LA")
    exif_rotated_jpeg(tmp_path / "turned.jpg")

    r, g, b = _mean_rgb(load_resized(tmp_path / "cmyk.jpg", (64, 64)))
    assert r > 240 and g < 15 and b < 15                     # red, as a viewer shows it
    assert all(abs(v - 127.5) < 1.5 for v in _mean_rgb(load_resized(tmp_path / "grey16.png", (64, 64))))  # not white
    assert _mean_rgb(load_resized(tmp_path / "rgb48.png", (64, 64))) == [128.0, 64.0, 255.0]
    pal = load_resized(tmp_path / "pal.png", (64, 64))
    blue = [float(v) for v in BLUE]
    assert _mean_rgb(pal, cols=slice(0, 30)) == [255.0] * 3 and _mean_rgb(pal, cols=slice(34, 64)) == blue
    paltr = load_resized(tmp_path / "paltr.png", (64, 64))   # index 0 transparent: white; index 1 blue
    assert _mean_rgb(paltr, cols=slice(0, 30)) == [255.0] * 3 and _mean_rgb(paltr, cols=slice(34, 64)) == blue
    alpha = load_resized(tmp_path / "alpha.png", (64, 64))   # opaque left half blue, transparent right half white
    assert _mean_rgb(alpha, cols=slice(0, 30)) == blue
    assert _mean_rgb(alpha, cols=slice(34, 64)) == [255.0] * 3
    la = load_resized(tmp_path / "la.png", (64, 64))
    assert _mean_rgb(la, cols=slice(0, 30)) == [30.0] * 3 and _mean_rgb(la, cols=slice(34, 64)) == [255.0] * 3
    turned = load_resized(tmp_path / "turned.jpg", (64, 128))  # upright: 64 wide, 128 high, red on top
    assert tuple(turned.shape) == (3, 128, 64)
    top, bottom = _mean_rgb(turned, rows=slice(0, 56)), _mean_rgb(turned, rows=slice(72, 128))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_picks_the_upright_bucket(tmp_path, tiny_cfg):
    (tmp_path / "ds" / "2_x").mkdir(parents=True)
    exif_rotated_jpeg(tmp_path / "ds" / "2_x" / "turned.jpg")
    cfg = tiny_cfg.replace(train_data_dir=str(tmp_path / "ds"), resolution="96", min_bucket_reso=32,
                           max_bucket_reso=192, bucket_reso_steps=32)
    data = build_data(cfg)
    assert data.items[0].size == (64, 128) and data.item_bucket[0] == (64, 128)   # stored 128x64: would be (128, 64)


def test_a_file_that_breaks_after_the_scan_is_named_not_raised(tmp_path, sd1_host, tiny_cfg):
    """The scan passed it; it is truncated before latent caching: a UserError naming it, no OSError."""
    d = tmp_path / "ds" / "2_x"
    png(d / "a.png")
    (d / "b.jpg").write_bytes(jpeg_bytes())
    cfg = tiny_cfg.replace(train_data_dir=str(tmp_path / "ds"), output_dir=str(tmp_path / "run"), max_train_epochs=1)
    assert diagnose(cfg).ok
    data = build_data(cfg)
    truncated_jpeg(d / "b.jpg")
    with pytest.raises(UserError, match=r"b\.jpg cannot be loaded for training: truncated: .*changed since"):
        data.cache_latents(sd1_host.encode_images, "", False)


def test_a_truncated_file_is_caught_even_when_pillow_is_told_to_accept_truncated_files(tmp_path):
    """Some WebUI code sets ImageFile.LOAD_TRUNCATED_IMAGES = True; a half image must still be skipped."""
    from PIL import ImageFile
    png(tmp_path / "2_x" / "a.png")
    truncated_jpeg(tmp_path / "2_x" / "half.jpg")
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        scan = scan_dataset(tmp_path)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert [str(p) for p, _ in scan.skipped] == [os.path.join("2_x", "half.jpg")]


def test_legacy_caption_encodings_are_guessed_and_named(tmp_path):
    from lora_trainer.dataset.captions import read_caption_file
    (tmp_path / "w.txt").write_bytes("café, crème brûlée".encode("cp1252"))
    (tmp_path / "r.txt").write_bytes("девушка, улыбка\r\nкрасное платье".encode("cp1251"))
    (tmp_path / "u.txt").write_bytes("plain, ascii".encode())
    assert (read_caption_file(tmp_path / "w.txt").text, read_caption_file(tmp_path / "w.txt").encoding) == \
        ("café, crème brûlée", "cp1252")
    assert (read_caption_file(tmp_path / "r.txt").text, read_caption_file(tmp_path / "r.txt").encoding) == \
        ("девушка, улыбка красное платье", "cp1251")
    assert read_caption_file(tmp_path / "u.txt").encoding == "utf-8"


def test_rescanning_is_cheap_and_sees_a_changed_file(tmp_path, monkeypatch):
    """The scan decodes every image; a second scan of unchanged files reuses the result, a changed file is
    decoded again."""
    from lora_trainer.dataset import images
    png(tmp_path / "2_x" / "a.png")
    p = tmp_path / "2_x" / "b.jpg"
    p.write_bytes(jpeg_bytes())
    assert len(scan_dataset(tmp_path).items) == 2
    calls = []
    real = images._decode
    monkeypatch.setattr(images, "_decode", lambda path: calls.append(path) or real(path))   # counts, still decodes
    assert len(scan_dataset(tmp_path).items) == 2 and calls == []
    truncated_jpeg(p)
    os.utime(p, ns=(1, 1))   # a different mtime even on coarse clocks
    scan = scan_dataset(tmp_path)
    assert calls == [p] and [x.name for x, _ in scan.skipped] == ["b.jpg"]
