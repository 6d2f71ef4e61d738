"""The dataset doctor on tiny generated datasets."""
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.config import TrainConfig
from lora_trainer.doctor import diagnose


def make(root: Path, folder: str, n: int, caption=lambda i: None, size=(64, 64)) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i % 255, 80, 160)).save(d / f"{i:03d}.png")
        text = caption(i)
        if text is not None:
            (d / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def cfg(root, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(root), resolution="64", min_bucket_reso=64, max_bucket_reso=128,
                bucket_reso_steps=64, train_batch_size=2, max_train_epochs=10, keep_tokens=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def guide_dataset(tmp_path):
    """The guide's example: 1_nekochan (76 images) + 6_maid (16 images) = 172 per epoch."""
    root = tmp_path / "ds"
    make(root, "1_nekochan", 76, lambda i: f"nekochan, cat ears, {'smile' if i % 2 else 'open mouth'}, solo")
    make(root, "6_maid", 16,
         lambda i: None if i < 2 else ("maid, apron, maid headdress" if i != 5 else "apron, indoors"))
    return root


def test_the_guides_172_iterations_case(guide_dataset):
    r = diagnose(cfg(guide_dataset))
    assert r.ok and r.subject == "character"
    assert r.images == 92 and r.iterations_per_epoch == 172
    by = {c.folder: c for c in r.concepts}
    assert (by["1_nekochan"].repeats, by["1_nekochan"].images, by["1_nekochan"].iterations) == (1, 76, 76)
    assert (by["6_maid"].repeats, by["6_maid"].images, by["6_maid"].iterations) == (6, 16, 96)
    assert by["6_maid"].without_caption == 2 and by["1_nekochan"].without_caption == 0
    assert by["1_nekochan"].caption_sample.startswith("nekochan, cat ears")
    assert by["1_nekochan"].top_tags[0] in (("nekochan", 76), ("cat ears", 76), ("solo", 76))
    assert dict(by["1_nekochan"].top_tags)["smile"] == 38
    # one bucket (64x64), batch 2: ceil(172 / 2) = 86 steps per epoch
    assert r.steps_per_epoch == 86 and r.epochs == 10 and r.total_steps == 860
    assert r.total_image_iterations == 1720
    text = "\n".join(r.warnings)
    assert "172 image-iterations per epoch is outside 200-600" in text
    assert "1720 image-iterations in all is outside the guide's 2000-7000" in text
    assert "6_maid: 2 of 16 images have no caption" in text
    # trigger words: nekochan and maid; the two uncaptioned images train as "maid", image 5 lacks it
    assert set(r.triggers) == {"nekochan", "maid"}
    assert by["6_maid"].missing_trigger == 1 and by["1_nekochan"].missing_trigger == 0
    assert "6_maid: 1 of 16 captions lack the trigger word" in text
    assert "Only" not in text  # 92 images are enough for a character
    md = r.to_markdown()
    assert "| 1_nekochan | 1 | 76 | 76 |" in md and "**172**" in md and "⚠️" in md


def test_style_numbers(tmp_path):
    root = make(tmp_path / "ds", "5_style", 60, lambda i: f"outdoors, tree, {i}")
    r = diagnose(cfg(root, keep_tokens=0, max_train_epochs=30))
    assert r.subject == "style" and r.triggers == []
    assert r.iterations_per_epoch == 300
    assert r.total_image_iterations == 9000  # inside 8000-12000
    text = "\n".join(r.warnings)
    assert "Only 60 images: the guide suggests 75-150 for a style" in text
    assert "in all is outside" not in text and "per epoch is outside" not in text
    assert "trigger" not in text


def test_subject_can_be_given(tmp_path):
    root = make(tmp_path / "ds", "5_style", 60, lambda i: f"outdoors, tree, {i}")
    r = diagnose(cfg(root, keep_tokens=0), subject="character")
    assert r.subject == "character" and not any(w.startswith("Only") for w in r.warnings)


def test_good_character_dataset_has_no_warnings(tmp_path):
    root = make(tmp_path / "ds", "5_mychar", 80, lambda i: f"mychar, {'smile' if i % 3 else 'sitting'}")
    r = diagnose(cfg(root, max_train_epochs=10))  # 400 per epoch, 4000 in all
    assert r.ok and r.warnings == [], r.warnings
    assert "✅" in r.to_markdown()


def test_max_train_steps_limits_the_totals(tmp_path):
    root = make(tmp_path / "ds", "5_mychar", 80, lambda i: "mychar, smile")
    r = diagnose(cfg(root, max_train_epochs=None, max_train_steps=1000))
    assert r.steps_per_epoch == 200 and r.epochs == 5 and r.total_steps == 1000
    assert r.total_image_iterations == 2000


def test_images_below_the_training_resolution(tmp_path):
    root = make(tmp_path / "ds", "5_mychar", 3, lambda i: "mychar", size=(96, 96))
    make(root, "5_mychar", 1, lambda i: "mychar", size=(256, 256))  # overwrites 000.png with a large one
    r = diagnose(cfg(root, resolution="128", min_bucket_reso=64, max_bucket_reso=256))
    up = [w for w in r.warnings if "upscaled" in w]
    assert up and up[0].startswith("2 images are smaller than their training size")
    assert "96x96 trains at 128x128 (1.3x)" in up[0]


def test_dataset_errors_become_a_report(tmp_path):
    r = diagnose(cfg(tmp_path / "nope"))
    assert not r.ok and "does not exist" in r.error
    assert "Dataset problem" in r.to_markdown() and "does not exist" in r.to_markdown()

    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    r = diagnose(cfg(tmp_path / "flat"))
    assert not r.ok and "10_mychar" in r.error

    bad = tmp_path / "bad"
    (bad / "mychar").mkdir(parents=True)
    r = diagnose(cfg(bad))
    assert not r.ok and "not named N_name" in r.error

    r = diagnose(cfg(tmp_path / "nope", train_data_dir=""))
    assert not r.ok and "(no folder)" in r.to_markdown()


def test_bad_resolution_is_reported_not_raised(tmp_path):
    root = make(tmp_path / "ds", "5_mychar", 2, lambda i: "mychar")
    r = diagnose(cfg(root, resolution="big"))
    assert not r.ok and "resolution" in r.error


def test_unreadable_files_are_listed(tmp_path):
    root = make(tmp_path / "ds", "5_mychar", 2, lambda i: "mychar")
    (root / "5_mychar" / "broken.png").write_bytes(b"not a png")
    r = diagnose(cfg(root))
    assert r.ok and any("skipped 5_mychar/broken.png" in w for w in r.warnings)


def test_markdown_escapes_table_breakers(tmp_path):
    root = make(tmp_path / "ds", "5_my|char", 2, lambda i: "a|b, c")
    md = diagnose(cfg(root)).to_markdown()
    assert "5_my\\|char" in md and "a\\|b" in md
