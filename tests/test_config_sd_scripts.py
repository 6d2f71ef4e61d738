"""The TOML we write is one sd-scripts reads the same way.

sd-scripts' ``train_util.read_config_from_file`` flattens every TOML table and puts the values into its
argparse namespace unconverted (``argparse.Namespace(**values)``, then ``parse_args(namespace=...)``), so a
value of the wrong type reaches its code as it is, and "" where it expects None is a path or a value.
Every key we write must be one the parser of ``train_network.py`` / ``sdxl_train_network.py`` declares,
with a value of the declared type, or one sd-scripts never reads.

Facts (kohya-ss/sd-scripts at 48d368f, read from ``train_network.setup_parser`` and the ``train_util.add_*``
/ ``custom_train_functions.add_custom_train_arguments`` functions it calls):
"""
from __future__ import annotations

import dataclasses
import sys

import pytest

from lora_trainer.config import UNSET_KEY, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STR, INT, FLOAT, BOOL, STR_LIST = "str", "int", "float", "bool (store_true)", "list of str (nargs='*')"
# type=float, nargs="*": a list; train_network.py also takes a bare number ("toml backward compatibility")
FLOAT_LIST_OR_FLOAT = "list of float (nargs='*') or float"
# type=int_or_float: an int from 1 up, a float below 1; get_scheduler_fix multiplies a float by all steps
INT_OR_FRACTION = "int_or_float"

SD_SCRIPTS_TYPES = {
    # train_util.add_sd_models_arguments
    "v2": BOOL, "v_parameterization": BOOL, "pretrained_model_name_or_path": STR,
    # train_util.add_dataset_arguments
    "train_data_dir": STR, "shuffle_caption": BOOL, "caption_extension": STR, "keep_tokens": INT,
    "caption_dropout_rate": FLOAT, "caption_tag_dropout_rate": FLOAT, "resolution": STR, "cache_latents": BOOL,
    "cache_latents_to_disk": BOOL, "enable_bucket": BOOL, "min_bucket_reso": INT, "max_bucket_reso": INT,
    "bucket_reso_steps": INT, "bucket_no_upscale": BOOL, "max_token_length": INT,
    # config_util.add_config_arguments (type=Path; a TOML string is read as the path)
    "dataset_config": STR,
    # train_util.add_training_arguments
    "output_dir": STR, "output_name": STR, "save_precision": STR, "save_every_n_epochs": INT,
    "save_last_n_epochs": INT, "save_state": BOOL, "resume": STR, "train_batch_size": INT, "xformers": BOOL,
    "sdpa": BOOL, "vae": STR, "max_train_steps": INT, "max_train_epochs": INT, "max_data_loader_n_workers": INT,
    "persistent_data_loader_workers": BOOL, "seed": INT, "gradient_checkpointing": BOOL,
    "gradient_accumulation_steps": INT, "mixed_precision": STR, "clip_skip": INT, "logging_dir": STR,
    "log_prefix": STR, "noise_offset": FLOAT, "multires_noise_iterations": INT, "multires_noise_discount": FLOAT,
    "zero_terminal_snr": BOOL, "sample_every_n_epochs": INT, "sample_prompts": STR, "sample_sampler": STR,
    "save_model_as": STR, "cache_text_encoder_outputs": BOOL, "torch_compile": BOOL, "dynamo_backend": STR,
    # train_util.add_optimizer_arguments
    "optimizer_type": STR, "learning_rate": FLOAT, "max_grad_norm": FLOAT, "optimizer_args": STR_LIST,
    "lr_scheduler_type": STR, "lr_scheduler_args": STR_LIST, "lr_scheduler": STR,
    "lr_warmup_steps": INT_OR_FRACTION, "lr_scheduler_num_cycles": INT, "lr_scheduler_power": FLOAT,
    # custom_train_functions.add_custom_train_arguments
    "min_snr_gamma": FLOAT,
    # train_network.setup_parser
    "unet_lr": FLOAT, "text_encoder_lr": FLOAT_LIST_OR_FLOAT, "network_weights": STR, "network_module": STR,
    "network_dim": INT, "network_alpha": FLOAT, "network_dropout": FLOAT, "network_args": STR_LIST,
    "network_train_unet_only": BOOL, "network_train_text_encoder_only": BOOL, "training_comment": STR,
    "scale_weight_norms": FLOAT,
}

# keys of ours that no sd-scripts code reads (no `args.<key>` anywhere in its tree; only --log_config's
# get_sanitized_config_or_none logs every namespace entry, these included, as a tracker hparam)
# ``subsets`` is LoRA_Easy's [[subsets]] (its dataset, inline in the training TOML): sd-scripts reads subsets only
# from the file named by --dataset_config
NOT_READ_BY_SD_SCRIPTS = {"config_version", "model_config", "save_state_every_n_minutes", UNSET_KEY, "subsets"}


def _type_ok(kind: str, v) -> bool:
    if kind == STR:
        return isinstance(v, str)
    if kind == INT:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == FLOAT:
        return isinstance(v, float)
    if kind == BOOL:
        return isinstance(v, bool)
    if kind == STR_LIST:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == FLOAT_LIST_OR_FLOAT:
        return isinstance(v, float) or (isinstance(v, list) and all(isinstance(x, float) for x in v))
    if kind == INT_OR_FRACTION:
        return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, float) and 0 < v < 1)
    raise AssertionError(kind)


def _configs():
    from lora_trainer import presets
    every_preset = [presets.apply_preset(TrainConfig(), n) for n in list(presets.preset_names("sd1"))
                    + list(presets.preset_names("sdxl"))]
    full = TrainConfig(
        train_data_dir="/data", output_dir="/out", output_name="x", pretrained_model_name_or_path="/m.safetensors",
        model_config="sd1", vae="/vae.safetensors", resume="auto", training_comment="hi", network_weights="/w",
        lr_scheduler_type="torch.optim.lr_scheduler.StepLR", lr_scheduler_args=["step_size=10"], logging_dir="/logs",
        log_prefix="p", sample_prompts="a cat", sample_every_n_epochs=1, save_last_n_epochs=3, network_dropout=0.1,
        scale_weight_norms=1.0, unet_lr=1e-4, noise_offset=0.05, multires_noise_iterations=6, lr_warmup_steps=100,
        network_args=["conv_dim=4"], optimizer_args=["weight_decay=0.01"], max_train_steps=500)
    unset = TrainConfig(text_encoder_lr=None, min_snr_gamma=None, max_train_epochs=None, max_train_steps=300,
                        lr_warmup_steps=0.05)
    subsets = TrainConfig.from_dict({"dataset_config": "/d.toml", "subsets": [
        {"image_dir": "/a", "num_repeats": 3, "keep_tokens": 1, "shuffle_caption": True, "caption_extension": ".txt"}]})
    return [TrainConfig(), full, unset, subsets] + every_preset


def test_every_key_we_know_is_typed_as_sd_scripts_or_listed_as_ours():
    ours = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    assert ours - set(SD_SCRIPTS_TYPES) - NOT_READ_BY_SD_SCRIPTS == set(), "a new setting: add its sd-scripts type"
    assert set(SD_SCRIPTS_TYPES) - ours == set()


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.output_name}-{c.optimizer_type}-{c.resolution}")
def test_written_toml_has_sd_scripts_types_and_no_empty_strings(cfg):
    written = tomllib.loads(cfg.to_toml())
    for key, value in written.items():
        if key in NOT_READ_BY_SD_SCRIPTS:
            continue
        assert key in SD_SCRIPTS_TYPES, f"{key} is written but is neither sd-scripts' nor listed as ours"
        assert _type_ok(SD_SCRIPTS_TYPES[key], value), (key, value, SD_SCRIPTS_TYPES[key])
        assert value != "", f"{key} = \"\": sd-scripts would take it as a value (e.g. a path), not as unset"
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg  # and it round-trips


def test_unset_options_are_left_out_and_read_back_unset():
    cfg = TrainConfig(text_encoder_lr=None, min_snr_gamma=None, max_train_epochs=None, max_train_steps=300,
                      noise_offset=None, vae="", lr_warmup_steps=20.0)
    written = tomllib.loads(cfg.to_toml())
    for key in ("text_encoder_lr", "min_snr_gamma", "max_train_epochs", "noise_offset", "vae", "output_dir"):
        assert key not in written
    assert written[UNSET_KEY] == ["text_encoder_lr", "min_snr_gamma", "max_train_epochs"]  # defaults here are set
    assert written["lr_warmup_steps"] == 20 and isinstance(written["lr_warmup_steps"], int)  # steps, not a fraction
    back = TrainConfig.from_toml(cfg.to_toml())
    assert (back.text_encoder_lr, back.min_snr_gamma, back.max_train_epochs, back.vae) == (None, None, None, "")
    assert back == cfg


def test_older_files_with_empty_strings_and_sd_scripts_lists_still_read():
    old = """config_version = 1
text_encoder_lr = ""
min_snr_gamma = ""
max_train_epochs = ""
max_train_steps = 200
vae = ""
save_last_n_epochs = ""
"""
    cfg = TrainConfig.from_toml(old)
    assert (cfg.text_encoder_lr, cfg.min_snr_gamma, cfg.max_train_epochs, cfg.save_last_n_epochs, cfg.vae) == \
        (None, None, None, None, "")
    # sd-scripts' own --output_config writes text_encoder_lr as a list (nargs="*")
    assert TrainConfig.from_toml("text_encoder_lr = [5e-5]").text_encoder_lr == 5e-5
    assert TrainConfig.from_toml("text_encoder_lr = []").text_encoder_lr is None
    # a value given as well as listed unset wins
    assert TrainConfig.from_toml(f'{UNSET_KEY} = ["min_snr_gamma"]\nmin_snr_gamma = 3.0').min_snr_gamma == 3.0


def test_bad_unset_lists_and_warmup_steps_name_the_value_and_the_fix():
    from lora_trainer.errors import ConfigError
    with pytest.raises(ConfigError, match="unset_options names 'seed'.*remove it"):
        TrainConfig.from_toml(f'{UNSET_KEY} = ["seed"]')
    with pytest.raises(ConfigError, match="text_encoder_lr.*write one number"):
        TrainConfig.from_toml("text_encoder_lr = [1e-4, 5e-5]")
    assert any("lr_warmup_steps = 10.5" in p and "whole" in p for p in TrainConfig(lr_warmup_steps=10.5).problems())
