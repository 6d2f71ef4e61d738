import pytest

from lora_trainer.config import TrainConfig, parse_kv_args
from lora_trainer.errors import ConfigError, UserError


def test_toml_round_trip_keeps_every_field_and_none():
    cfg = TrainConfig(train_data_dir="C:\\data\\set", output_dir="/o", output_name="my-lora", network_dim=16,
                      network_alpha=8.0, network_args=["conv_dim=8", "conv_alpha=1"], text_encoder_lr=None,
                      min_snr_gamma=None, optimizer_args=["betas=0.9,0.99", "weight_decay=0.01"],
                      sample_prompts='a "quoted"\nsecond line', max_train_steps=100)
    back = TrainConfig.from_toml(cfg.to_toml())
    assert back == cfg
    assert back.text_encoder_lr is None and back.min_snr_gamma is None


def test_sd_scripts_toml_loads_unchanged_and_reports_unknown_keys():
    text = """
[model_arguments]
pretrained_model_name_or_path = "/models/anything-v3.safetensors"
v2 = false
[additional_network_arguments]
network_dim = 64
network_alpha = 32
network_args = ["conv_dim=16", "conv_alpha=8"]
unet_lr = 0.0001
text_encoder_lr = 5e-5
network_module = "networks.lora"
[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999"]
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 4
lr_warmup_steps = 0.05
[dataset_arguments]
resolution = "768,512"
train_data_dir = "/data"
cache_latents = true
debug_dataset = false
[training_arguments]
max_train_epochs = 12
save_every_n_epochs = 1
mixed_precision = "bf16"
clip_skip = 2
some_future_flag = 3
"""
    cfg = TrainConfig.from_toml(text)
    assert cfg.network_dim == 64 and cfg.network_alpha == 32.0
    assert cfg.network_args_dict() == {"conv_dim": 16, "conv_alpha": 8}
    assert cfg.optimizer_args_dict() == {"weight_decay": 0.01, "betas": (0.9, 0.999)}
    assert cfg.resolution_wh() == (768, 512)
    assert cfg.clip_skip == 2 and cfg.lr_scheduler_num_cycles == 4
    assert cfg.unknown == {"debug_dataset": False, "some_future_flag": 3}
    assert "some_future_flag = 3" in cfg.to_toml()  # kept, not dropped


def test_set_overrides_read_toml_values_and_bare_words():
    cfg = TrainConfig().with_overrides(["network_dim=16", "output_name=abc", "learning_rate=2e-4",
                                        "network_args=[\"conv_dim=4\"]", "cache_latents=false"])
    assert (cfg.network_dim, cfg.output_name, cfg.learning_rate, cfg.network_args, cfg.cache_latents) == \
        (16, "abc", 2e-4, ["conv_dim=4"], False)
    with pytest.raises(UserError):
        TrainConfig().with_overrides(["network_dim"])
    with pytest.raises(ConfigError, match="network_dim"):
        TrainConfig().with_overrides(["network_dim=many"])


@pytest.mark.parametrize("changes, needle", [
    ({"network_dim": 0}, "network_dim = 0"),
    ({"learning_rate": -1e-4}, "learning_rate = -0.0001"),
    ({"max_train_epochs": None, "max_train_steps": None}, "neither max_train_epochs nor max_train_steps"),
    ({"output_name": "../evil"}, "output_name '../evil'"),
    ({"output_name": "a/b"}, "output_name 'a/b'"),
    ({"output_name": "a\\b"}, "not a plain file name"),
    ({"resolution": "5x"}, "resolution"),
    ({"resolution": "500"}, "multiples of 8"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"max_token_length": 100}, "75, 150 or 225"),
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "choose one"),
    ({"optimizer_args": ["weight_decay"]}, "not key=value"),
    ({"min_bucket_reso": 2048}, "min_bucket_reso"),
])
def test_validation_names_the_value_and_the_fix(changes, needle):
    cfg = TrainConfig(train_data_dir="/d", output_dir="/o").replace(**changes)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert needle in str(e.value)


def test_defaults_are_valid():
    TrainConfig(train_data_dir="/d", output_dir="/o").validate()


def test_kv_args_typed_parsing():
    d = parse_kv_args(["a=1", "b=0.5", "c=true", "d=0.9,0.999", "e=name", "f=None"], "x")
    assert d == {"a": 1, "b": 0.5, "c": True, "d": (0.9, 0.999), "e": "name", "f": None}
