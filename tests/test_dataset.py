import random

import pytest
import torch
from PIL import Image

from lora_trainer.dataset.buckets import choose_bucket, load_resized, make_buckets
from lora_trainer.dataset.captions import CaptionRules
from lora_trainer.dataset.folders import scan_dataset, tag_frequency
from lora_trainer.dataset.latent_cache import cache_path
from lora_trainer.errors import DatasetError
from lora_trainer.run import build_data, plan


def _img(path, size=(64, 64), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_guide_example_172_iterations_per_epoch(tmp_path):
    for i in range(76):
        _img(tmp_path / "1_nekochan" / f"{i}.png", (16, 16))
        (tmp_path / "1_nekochan" / f"{i}.txt").write_text("nekochan, 1girl")
    for i in range(16):
        _img(tmp_path / "6_maid" / f"{i}.jpg", (16, 16))
    scan = scan_dataset(tmp_path)
    assert scan.iterations_per_epoch == 172
    maid = [c for c in scan.concepts if c.folder == "6_maid"][0]
    assert maid.missing_captions == 16 and maid.repeats == 6
    assert {it.caption for it in scan.items if it.concept == "6_maid"} == {"maid"}


def test_missing_and_empty_captions_use_concept_name_and_are_counted(tmp_path):
    d = tmp_path / "6_photo"
    _img(d / "a.png")
    _img(d / "b.webp")
    _img(d / "c.bmp")
    (d / "b.txt").write_text("   \n")
    (d / "c.txt").write_text("photo, cat,\r\nsunny")
    scan = scan_dataset(tmp_path)
    caps = {it.path.name: (it.caption, it.caption_source) for it in scan.items}
    assert caps == {"a.png": ("photo", "missing"), "b.webp": ("photo", "empty"), "c.bmp": ("photo, cat, sunny", "file")}
    assert scan.concepts[0].missing_captions == 1 and scan.concepts[0].empty_captions == 1
    assert any("1 without caption" in line and "1 empty" in line for line in scan.summary_lines())


def test_other_caption_extension(tmp_path):
    _img(tmp_path / "2_x" / "a.png")
    (tmp_path / "2_x" / "a.caption").write_text("from caption file")
    (tmp_path / "2_x" / "a.txt").write_text("from txt")
    assert scan_dataset(tmp_path, ".caption").items[0].caption == "from caption file"


def test_no_concept_folders(tmp_path):
    _img(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="no concept folders.*10_mychar"):
        scan_dataset(tmp_path)


def test_folder_without_repeats_prefix_is_named(tmp_path):
    _img(tmp_path / "10_good" / "a.png")
    _img(tmp_path / "mychar" / "a.png")
    _img(tmp_path / "0_zero" / "a.png")
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path)
    assert "mychar" in str(e.value) and "0_zero" in str(e.value) and "Rename" in str(e.value)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_unreadable_and_empty_images_are_skipped_and_listed(tmp_path):
    d = tmp_path / "3_c"
    _img(d / "good.png")
    (d / "zero.png").write_bytes(b"")
    (d / "junk.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    full = tmp_path / "t.png"
    _img(full, (64, 64))
    (d / "trunc.png").write_bytes(full.read_bytes()[:60])
    scan = scan_dataset(tmp_path)
    assert [it.path.name for it in scan.items] == ["good.png"]
    skipped = {p.name: why for p, why in scan.skipped}
    assert set(skipped) == {"zero.png", "junk.jpg", "trunc.png"}
    assert "0 bytes" in skipped["zero.png"]


def test_fails_when_no_image_remains(tmp_path):
    d = tmp_path / "3_c"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="No usable images.*1 files were skipped"):
        scan_dataset(tmp_path)


def test_small_images_are_reported(tmp_path):
    _img(tmp_path / "1_x" / "tiny.png", (32, 48))
    scan = scan_dataset(tmp_path, min_side=256)
    assert any("smaller than the smallest bucket" in w and "tiny.png" in w for w in scan.warnings)


def test_caption_rules_keep_tokens_shuffle_and_dropout():
    rules = CaptionRules(shuffle_caption=True, keep_tokens=1)
    cap = "trigger, a, b, c, d, e"
    outs = {rules.apply(cap, random.Random(s)) for s in range(30)}
    assert all(o.startswith("trigger, ") for o in outs) and len(outs) > 5
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert rules.apply(cap, random.Random(3)) == rules.apply(cap, random.Random(3))
    drop = CaptionRules(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [drop.apply(cap, random.Random(s)) for s in range(50)]
    assert all(o.startswith("trigger") for o in outs) and min(len(o.split(", ")) for o in outs) < 6
    assert CaptionRules(caption_dropout_rate=0.999).apply(cap, random.Random(0)) == ""
    assert CaptionRules().apply(cap, random.Random(0)) == cap


def test_tag_frequency(tmp_path):
    for i, cap in enumerate(["t, red", "t, blue", "t, red, red"]):
        _img(tmp_path / "2_x" / f"{i}.png")
        (tmp_path / "2_x" / f"{i}.txt").write_text(cap)
    assert tag_frequency(scan_dataset(tmp_path).items) == {"2_x": {"t": 3, "red": 2, "blue": 1}}


def test_buckets_fit_area_and_choose_closest_aspect():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert choose_bucket((1000, 1000), buckets) == (512, 512)
    w, h = choose_bucket((1920, 1080), buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.25
    assert choose_bucket((100, 100), buckets, no_upscale=True) == min(buckets, key=lambda b: b[0] * b[1])


def test_load_resized_covers_and_centre_crops(tmp_path):
    p = tmp_path / "wide.png"
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 50, 100))  # blue left quarter gets cropped away at 1:1
    im.save(p)
    t = load_resized(p, (64, 64))
    assert t.shape == (3, 64, 64) and t.min() >= -1 and t.max() <= 1
    assert t[0].mean() > 0.9 and t[2].mean() < -0.9  # red kept, blue cropped


def test_plan_counts_steps_per_bucket_and_accumulation(tiny_cfg):
    data = build_data(tiny_cfg.replace(train_batch_size=2, gradient_accumulation_steps=2, max_train_epochs=3))
    assert data.scan.iterations_per_epoch == 3 * 4 + 1 * 3
    assert data.steps_per_epoch() == sum(-(-n // 2) for n in data.bucket_counts().values())
    p = plan(tiny_cfg.replace(train_batch_size=2, gradient_accumulation_steps=2, max_train_epochs=3), data)
    assert p.total_steps == 3 * -(-data.steps_per_epoch() // 2)
    p = plan(tiny_cfg.replace(max_train_epochs=None, max_train_steps=7, lr_warmup_steps=0.5), data)
    assert p.total_steps == 7 and p.warmup_steps == 3
    batches = data.epoch_batches(1)
    assert sorted(i for b in batches for i in b.indices) == sorted(
        i for i, it in enumerate(data.items) for _ in range(it.repeats))
    assert data.epoch_batches(1)[0].indices == batches[0].indices  # seeded
    assert all(len({data.item_bucket[i] for i in b.indices}) == 1 for b in batches)


def test_disk_latent_cache_is_keyed_and_rebuilt(sd1_host, tiny_cfg):
    data = build_data(tiny_cfg)
    calls = []

    def encode(x):
        calls.append(len(x))
        return sd1_host.encode_images(x)

    fp = sd1_host.vae_fingerprint()
    data.cache_latents(encode, fp, to_disk=True)
    n = len(data.items)
    assert sum(calls) == n and data.cache_hits == 0
    first = [z.clone() for z in data.latents]
    # a second run reads everything back
    data2 = build_data(tiny_cfg)
    calls.clear()
    data2.cache_latents(encode, fp, to_disk=True)
    assert sum(calls) == 0 and data2.cache_hits == n
    assert all(torch.equal(a, b) for a, b in zip(first, data2.latents))
    # a changed image, a corrupt cache file and another VAE each rebuild
    changed = data.items[0].path
    Image.new("RGB", (64, 64), (0, 255, 0)).save(changed)
    cache_path(data.items[1].path).write_bytes(b"garbage")
    data3 = build_data(tiny_cfg)
    calls.clear()
    data3.cache_latents(encode, fp, to_disk=True)
    assert sum(calls) == 2 and data3.cache_hits == n - 2
    assert not torch.equal(data3.latents[0], first[0])
    data4 = build_data(tiny_cfg)
    calls.clear()
    data4.cache_latents(encode, "another-vae", to_disk=True)
    assert sum(calls) == n
    # and a different resolution (bucket) too
    data5 = build_data(tiny_cfg.replace(resolution="128", max_bucket_reso=128))
    calls.clear()
    data5.cache_latents(encode, "another-vae", to_disk=True)
    assert sum(calls) == n and data5.latents[0].shape[-1] == 16


def test_truncate_tags_keeps_whole_leading_tags():
    from lora_trainer.dataset.captions import truncate_tags
    words = lambda t: len(t.split())  # one token per word, for the test
    cap = "trigger, red circle, simple white background, large"
    assert truncate_tags(cap, words, 75) == cap
    assert truncate_tags(cap, words, 4) == "trigger, red circle"          # 1 + (1+2) = 4
    assert truncate_tags(cap, words, 3) == "trigger"
    assert truncate_tags(cap, words, 0) == ""
