"""sd-scripts' dataset config (``dataset_config``) and LoRA_Easy's ``[[subsets]]``: each subset is a concept
(any folder name, ``num_repeats``, ``class_tokens`` as the caption fallback); what is not supported is refused
with the reason before any model work."""
from __future__ import annotations

import pytest

from lora_trainer import tiny
from lora_trainer.config import TrainConfig
from lora_trainer.doctor import diagnose
from lora_trainer.errors import UserError
from lora_trainer.run import build_data, train

FAST = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64, network_dim=4,
            network_alpha=4.0, learning_rate=1e-3, text_encoder_lr=5e-4, lr_scheduler="constant", max_train_epochs=1,
            mixed_precision="no", max_token_length=75, save_precision="float", seed=1, save_state=False)


@pytest.fixture()
def folders(tmp_path):
    """Two image folders without N_ prefixes: redcircle (4 images, one without caption), bluesquare (3)."""
    root = tiny.make_dataset(tmp_path / "src")
    (root / "3_redcircle").rename(root / "redcircle")
    (root / "1_bluesquare").rename(root / "bluesquare")
    return root


def _toml_path(p):
    return str(p).replace("\\", "/")


def _dataset_toml(tmp_path, folders, general="", dataset="", extra_subset=""):
    text = f"""[general]
shuffle_caption = false
keep_tokens = 1
{general}

[[datasets]]
resolution = 64
batch_size = 1
{dataset}

  [[datasets.subsets]]
  image_dir = "{_toml_path(folders / 'redcircle')}"
  num_repeats = 3
  class_tokens = "sks circle"
  {extra_subset}

  [[datasets.subsets]]
  image_dir = "{_toml_path(folders / 'bluesquare')}"
"""
    p = tmp_path / "dataset.toml"
    p.write_text(text, encoding="utf-8")
    return p


def _lora_easy_toml(tmp_path, folders, first="", second=""):
    text = f"""output_name = "easy"
output_dir = "{_toml_path(tmp_path / 'out')}"
train_batch_size = 1

[[subsets]]
image_dir = "{_toml_path(folders / 'redcircle')}"
num_repeats = 2
keep_tokens = 1
shuffle_caption = true
caption_extension = ".txt"
{first}

[[subsets]]
image_dir = "{_toml_path(folders / 'bluesquare')}"
num_repeats = 4
keep_tokens = 1
shuffle_caption = true
caption_extension = ".txt"
{second}
"""
    p = tmp_path / "easy.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_dataset_config_trains_with_its_repeats_fallback_and_settings(sd1_host, tmp_path, folders):
    ds = _dataset_toml(tmp_path, folders)
    cfg = TrainConfig(dataset_config=str(ds), output_dir=str(tmp_path / "out"), output_name="dc", **FAST)
    data = build_data(cfg)
    by = {c.folder: c for c in data.scan.concepts}
    assert (by["redcircle"].repeats, by["redcircle"].images) == (3, 4)
    assert (by["bluesquare"].repeats, by["bluesquare"].images) == (1, 3)   # num_repeats defaults to 1
    assert data.scan.iterations_per_epoch == 4 * 3 + 3 * 1                  # Σ images × num_repeats
    missing = [it for it in data.items if it.caption_source == "missing"]
    assert [it.caption for it in missing] == ["sks circle"]                 # class_tokens, not the folder name
    assert data.batch_size == 1                                             # the dataset's batch_size
    assert data.caption_rules.shuffle_caption is False                      # [general] applies
    result = train(cfg, sd1_host)
    assert result.files and result.files[-1].exists()
    from lora_trainer.io.lora_file import read_metadata
    meta = read_metadata(result.files[-1])
    import json
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs == {"redcircle": {"n_repeats": 3, "img_count": 4}, "bluesquare": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_batches_per_epoch"] == str(15)                      # batch 1 from the dataset config


def test_lora_easy_subsets_load_and_train(sd1_host, tmp_path, folders):
    cfg = TrainConfig.load(_lora_easy_toml(tmp_path, folders)).replace(
        **{k: v for k, v in FAST.items() if k != "train_batch_size"})
    assert "subsets" not in cfg.unknown and len(cfg.subsets) == 2
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg   # subsets round-trip
    data = build_data(cfg)
    assert data.scan.iterations_per_epoch == 4 * 2 + 3 * 4
    assert [it.caption for it in data.items if it.caption_source == "missing"] == ["redcircle"]  # the folder's name
    assert data.caption_rules.shuffle_caption and data.caption_rules.keep_tokens == 1
    result = train(cfg, sd1_host)
    assert result.files and result.files[-1].exists()
    assert "iterations per epoch: 20" in result.dataset_summary


def test_doctor_shows_subsets(tmp_path, folders):
    cfg = TrainConfig(dataset_config=str(_dataset_toml(tmp_path, folders)), **FAST)
    report = diagnose(cfg)
    assert report.ok, report.error
    assert [(c.folder, c.repeats, c.images) for c in report.concepts] == [("redcircle", 3, 4), ("bluesquare", 1, 3)]
    assert report.iterations_per_epoch == 15
    md = report.to_markdown()
    assert "redcircle" in md and "dataset.toml" in md


def _error(cfg) -> str:
    with pytest.raises(UserError) as e:
        build_data(cfg)
    report = diagnose(cfg)   # the doctor words it the same, without raising
    assert report.error and str(e.value) in report.error
    return str(e.value)


def test_is_reg_and_flip_aug_are_refused_with_the_reason(tmp_path, folders):
    cfg = TrainConfig(dataset_config=str(_dataset_toml(tmp_path, folders, extra_subset="is_reg = true\n  flip_aug = true")),
                      **FAST)
    msg = _error(cfg)
    assert "is_reg = True: regularisation images are not supported" in msg
    assert "flip_aug = True: horizontal flip" in msg


def test_controlnet_and_conflicting_datasets_are_refused(tmp_path, folders):
    cfg = TrainConfig(dataset_config=str(_dataset_toml(
        tmp_path, folders, extra_subset=f'conditioning_data_dir = "{_toml_path(folders)}"')), **FAST)
    assert "ControlNet datasets are not supported" in _error(cfg)
    p = _dataset_toml(tmp_path, folders)
    p.write_text(p.read_text() + f'\n[[datasets]]\nresolution = 128\n  [[datasets.subsets]]\n  image_dir = '
                                 f'"{_toml_path(folders / "bluesquare")}"\n', encoding="utf-8")
    msg = _error(TrainConfig(dataset_config=str(p), **FAST))
    assert "differ in resolution" in msg and "one [[datasets]]" in msg


def test_dataset_setting_conflicting_with_the_config_is_refused(tmp_path, folders):
    cfg = TrainConfig(dataset_config=str(_dataset_toml(tmp_path, folders)), **{**FAST, "resolution": "128"})
    assert "sets resolution = '64' but the training config has resolution = '128'" in _error(cfg)


def test_missing_image_dir_and_empty_folder_are_refused(tmp_path, folders):
    (folders / "empty").mkdir()
    cfg = TrainConfig.load(_lora_easy_toml(tmp_path, folders)).replace(**FAST)
    cfg.subsets[0].image_dir = str(folders / "nowhere")
    assert "image_dir" in _error(cfg) and "does not exist" in _error(cfg)
    cfg.subsets[0].image_dir = str(folders / "empty")
    msg = _error(cfg)
    assert "hold no image that can train" in msg and "empty" in msg


def test_conflicting_per_subset_settings_are_refused(tmp_path, folders):
    cfg = TrainConfig.load(_lora_easy_toml(tmp_path, folders, second="")).replace(**FAST)
    cfg.subsets[1].keep_tokens = 0
    msg = _error(cfg)
    assert "the subsets differ in keep_tokens (redcircle: 1, bluesquare: 0)" in msg


def test_per_subset_caption_extension_and_prefix(tmp_path, folders):
    for f in (folders / "bluesquare").glob("*.txt"):
        f.rename(f.with_suffix(".caption"))
    cfg = TrainConfig.load(_lora_easy_toml(tmp_path, folders)).replace(**FAST)
    cfg.subsets[1].caption_extension = ".caption"
    cfg.subsets[1].caption_prefix = "style_b,"
    data = build_data(cfg)
    blue = [it for it in data.items if it.concept == "bluesquare"]
    assert all(it.caption_source == "file" and it.caption.startswith("style_b, trigger_b") for it in blue)


def test_unknown_subset_key_is_refused_at_load(tmp_path, folders):
    with pytest.raises(UserError, match="unknown subset key 'flipaug'"):
        TrainConfig.load(_lora_easy_toml(tmp_path, folders, first="flipaug = true"))


def test_empty_train_data_dir_is_no_longer_the_message(tmp_path, folders):
    cfg = TrainConfig.load(_lora_easy_toml(tmp_path, folders))
    assert not any("train_data_dir" in p for p in cfg.problems())
