"""Presets: every one is a valid config, and the numbers are the guide's where it gives them."""
import dataclasses

import pytest

from lora_trainer import presets
from lora_trainer.config import TrainConfig, field_help
from lora_trainer.errors import UserError

ALL = presets.preset_names()


def test_eight_twelve_twentyfour_gb_for_characters_and_styles_in_both_optimizer_flavours():
    assert len(ALL) == 12
    combos = {(p.card_gb, p.subject, p.optimizer) for p in presets.PRESETS.values()}
    assert combos == {(c, s, o) for c in (8, 12, 24) for s in ("character", "style") for o in ("AdamW8bit", "adaptive")}
    assert "8 GB character" in ALL and "24 GB style (adaptive)" in ALL


@pytest.mark.parametrize("name", ALL)
def test_every_preset_validates_and_names_only_real_fields(name):
    p = presets.get_preset(name)
    known = set(field_help())
    assert set(p.overrides) <= known, set(p.overrides) - known
    cfg = presets.apply_preset(TrainConfig(), name)
    assert cfg.problems(need_dataset=False, need_output=False) == []
    assert p.description and "\n" not in p.description


@pytest.mark.parametrize("name", ALL)
def test_every_preset_passes_the_optimizer_and_schedule_checks(name):
    """Arguments and schedule fit the optimizer (a package missing from this machine is not the preset's fault)."""
    from lora_trainer.optim.setup import setting_problems
    problems = setting_problems(presets.apply_preset(TrainConfig(), name))
    assert [p for p in problems if "install" not in p and "CPU" not in p] == []


@pytest.mark.parametrize("name", ALL)
def test_guide_numbers(name):
    p = presets.get_preset(name)
    c = presets.apply_preset(TrainConfig(), name)
    assert c.min_snr_gamma == 5
    assert c.max_token_length == 225
    assert c.network_dim == 64                               # 64 is the guide's default; over 128 is waste
    assert c.mixed_precision == "bf16" and c.save_precision == "bf16"
    assert c.save_every_n_epochs == 1 and c.save_last_n_epochs is None  # every epoch, none deleted
    assert c.shuffle_caption and c.clip_skip == 2 and c.cache_latents
    assert 256 <= c.min_bucket_reso and c.max_bucket_reso <= 1536
    assert c.keep_tokens == (1 if p.subject == "character" else 0)
    if p.subject == "character":
        assert 1 <= c.network_alpha <= 16                    # simple characters: alpha 1-16 at dim 64
        assert c.network_args_dict().get("conv_dim") is None
    else:
        assert c.network_dim / 4 <= c.network_alpha <= c.network_dim   # styles: dim/1 - dim/4
        conv = c.network_args_dict()["conv_dim"]
        assert c.network_dim / 4 <= conv <= c.network_dim / 2           # LoCon: dim/2 - dim/4
    if p.optimizer == "AdamW8bit":
        assert c.optimizer_type == "AdamW8bit"
        assert c.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
        ratio = c.effective_unet_lr() / c.effective_text_encoder_lr()
        assert 2 <= ratio <= 3                               # text encoder = UNet / 2-3
        if c.network_alpha == c.network_dim:
            assert c.effective_unet_lr() == 1e-4             # 1e-4 at dim = alpha
        if c.network_alpha == 1:
            assert c.effective_unet_lr() == 1e-3             # alpha 1, dim 64 -> 1e-3
        assert 0.05 <= c.lr_warmup_steps <= 0.1
        assert c.lr_scheduler != "constant"
    else:
        assert c.optimizer_type == "DAdaptAdam"
        assert c.optimizer_args == ["decouple=True", "weight_decay=0.01", "betas=0.9,0.99"]
        assert 0.5 <= c.learning_rate <= 2.0 and c.unet_lr is None and c.text_encoder_lr is None  # one lr only
        assert c.lr_scheduler == "constant" and c.lr_warmup_steps == 0


def test_memory_grows_with_the_card():
    by_card = {p.card_gb: presets.apply_preset(TrainConfig(), p.name) for p in presets.PRESETS.values()
               if p.subject == "character" and p.optimizer == "AdamW8bit"}
    cost = {gb: c.resolution_wh()[0] ** 2 * c.train_batch_size / (2 if c.gradient_checkpointing else 1)
            for gb, c in by_card.items()}
    assert cost[8] < cost[12] < cost[24]
    assert by_card[8].gradient_checkpointing and by_card[8].resolution == "512"
    assert by_card[8].train_batch_size <= 2                  # small cards: 1-2


def test_epochs_land_in_the_guides_totals_at_its_per_epoch_rates():
    for p in presets.PRESETS.values():
        c = presets.apply_preset(TrainConfig(), p.name)
        lo, hi = (300, 500) if p.subject == "character" else (400, 600)
        total_lo, total_hi = (2000, 7000) if p.subject == "character" else (8000, 12000)
        assert total_lo <= c.max_train_epochs * lo and c.max_train_epochs * hi <= total_hi


def test_apply_overwrites_only_the_preset_fields_and_shares_no_lists():
    base = TrainConfig(train_data_dir="/data", output_name="mine", seed=7, network_dim=8, optimizer_args=["x=1"])
    c = presets.apply_preset(base, "12 GB style")
    assert (c.train_data_dir, c.output_name, c.seed) == ("/data", "mine", 7)
    assert c.network_dim == 64 and base.network_dim == 8 and base.optimizer_args == ["x=1"]
    c.network_args.append("conv_alpha=1")
    assert presets.PRESETS["12 GB style"].overrides["network_args"] == ["conv_dim=32", "conv_alpha=32"]
    assert dataclasses.asdict(presets.apply_preset(base, "12 GB style")) != dataclasses.asdict(base)


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="8 GB character"):
        presets.apply_preset(TrainConfig(), "16 GB")


def test_every_preset_field_is_a_tab_field_and_every_config_field_is_placed():
    """Applying a preset in the tab writes its fields into widgets: each must have one. And every
    config field is either shown in a tab section or hidden with a reason (one table, kept in sync)."""
    from lora_trainer.webui import tab_fields
    shown = tab_fields.ui_fields()
    assert len(shown) == len(set(shown))
    assert not set(shown) & set(tab_fields.HIDDEN)
    assert set(shown) | set(tab_fields.HIDDEN) == set(field_help())
    for p in list(presets.PRESETS.values()) + list(presets.SDXL_PRESETS.values()):
        assert set(p.overrides) <= set(shown), set(p.overrides) - set(shown)


@pytest.mark.parametrize("name", ALL)
def test_preset_survives_the_round_trip_through_the_widgets(name):
    from lora_trainer.webui import tab_fields
    cfg = presets.apply_preset(TrainConfig(train_data_dir="/d"), name)
    assert tab_fields.config_from_ui(tab_fields.ui_values(cfg)) == cfg


SDXL = presets.preset_names("sdxl")


def test_sdxl_presets_cards_subjects_optimizers():
    assert len(SDXL) == 12 and not set(SDXL) & set(ALL)
    combos = {(p.card_gb, p.subject, p.optimizer) for p in presets.SDXL_PRESETS.values()}
    assert combos == {(c, s, o) for c in (12, 16, 24) for s in ("character", "style") for o in ("AdamW8bit", "Prodigy")}


@pytest.mark.parametrize("name", SDXL)
def test_every_sdxl_preset_is_valid_and_sdxl_shaped(name):
    from lora_trainer.optim.setup import setting_problems
    p = presets.get_preset(name)
    assert set(p.overrides) <= set(field_help())
    c = presets.apply_preset(TrainConfig(), name)
    assert c.problems(need_dataset=False, need_output=False) == []
    assert [x for x in setting_problems(c) if "install" not in x and "CPU" not in x] == []
    assert c.resolution_wh() == (1024, 1024) and (c.min_bucket_reso, c.max_bucket_reso) == (512, 2048)
    assert c.network_train_unet_only and c.cache_text_encoder_outputs and c.gradient_checkpointing
    assert c.train_batch_size == {12: 1, 16: 2, 24: 4}[p.card_gb]
    assert c.optimizer_type == p.optimizer


def test_doctor_warns_sdxl_at_512(tmp_path):
    from lora_trainer import tiny
    from lora_trainer.doctor import diagnose
    root = tiny.make_dataset(tmp_path / "ds")
    cfg = TrainConfig(train_data_dir=str(root), resolution="512", min_bucket_reso=64, max_bucket_reso=1024)
    assert any("SDXL" in w and "1024" in w for w in diagnose(cfg, model_kind="sdxl").warnings)
    assert not any("SDXL" in w for w in diagnose(cfg, model_kind="sd1").warnings)
    big = cfg.replace(resolution="1024", min_bucket_reso=512, max_bucket_reso=2048)
    assert not any("trained at 1024x1024" in w for w in diagnose(big, model_kind="sdxl").warnings)
    assert any("SDXL size" in w for w in diagnose(big, model_kind="sd1").warnings)
