"""Which TrainConfig fields the Train LoRA tab shows, in which section and row, with which widget, and the
conversions between widget values and config values. No gradio here: the tab builds from this table.

Adding a field to the tab = adding its name to one row of a section (and a ``CHOICES`` entry if it is a
dropdown). Every config field is either in a section or in ``HIDDEN`` with the reason.
"""
from __future__ import annotations

import logging
import shlex
import typing
from typing import Any, Dict, List, Tuple

from ..config import TrainConfig, field_help

log = logging.getLogger(__name__)

# (key, title, rows of field names, open at start), in the guide's order. One inner list = one row
# of the form: a field alone fills the row (paths, argument lists); short ones share it.
SECTIONS: List[Tuple[str, str, List[List[str]], bool]] = [
    ("dataset", "Dataset", [["train_data_dir"], ["dataset_config"]], True),
    ("network", "Network", [
        ["network_module", "network_dim", "network_alpha"],
        ["network_args"],
        ["network_dropout", "scale_weight_norms"],
        ["network_train_unet_only", "network_train_text_encoder_only"],
        ["network_weights"]], True),
    ("optimizer", "Optimizer, schedule & length", [
        ["optimizer_type", "learning_rate", "lr_scheduler"],
        ["optimizer_args"],
        ["unet_lr", "text_encoder_lr", "lr_warmup_steps"],
        ["lr_scheduler_num_cycles", "lr_scheduler_power", "max_grad_norm"],
        ["lr_scheduler_type", "lr_scheduler_args"],
        ["min_snr_gamma", "noise_offset", "multires_noise_iterations", "multires_noise_discount"],
        ["max_train_epochs", "max_train_steps", "train_batch_size"],
        ["gradient_accumulation_steps", "seed"]], True),
    ("resolution", "Resolution & buckets", [
        ["resolution", "min_bucket_reso", "max_bucket_reso"],
        ["bucket_reso_steps", "enable_bucket", "bucket_no_upscale"]], True),
    ("captions", "Captions", [
        ["caption_extension", "shuffle_caption", "keep_tokens"],
        ["max_token_length", "clip_skip"],
        ["caption_dropout_rate", "caption_tag_dropout_rate"]], True),
    ("precision", "Precision & memory", [
        ["mixed_precision", "gradient_checkpointing", "cache_latents", "cache_latents_to_disk"],
        ["cache_text_encoder_outputs"]], True),
    ("saving", "Saving", [
        ["output_name", "save_precision"],
        ["save_every_n_epochs", "save_last_n_epochs"],
        ["save_state", "save_state_every_n_minutes"],
        ["training_comment"]], True),
    ("logs", "Samples & logs", [
        ["sample_prompts"],
        ["sample_every_n_epochs", "sample_sampler"],
        ["logging_dir", "log_prefix"]], False),
]

# Fields the WebUI does not show, and why (they still load from and save to TOML files).
HIDDEN: Dict[str, str] = {
    "pretrained_model_name_or_path": "the WebUI trains the loaded checkpoint",
    "model_config": "the WebUI trains the loaded checkpoint",
    "v2": "detected from the loaded checkpoint",
    "v_parameterization": "detected from the loaded checkpoint",
    "vae": "the loaded VAE is used",
    "resume": "the Resume button (unfinished runs) sets it for one run",
    "zero_terminal_snr": "the WebUI's Noise schedule setting (Settings > Sampler parameters) is used",
    "output_dir": "the WebUI writes to the Lora folder, in a folder named after output_name",
    "save_model_as": "only safetensors is written",
    "max_data_loader_n_workers": "images are prepared in-process",
    "persistent_data_loader_workers": "images are prepared in-process",
    "xformers": "the WebUI's attention is used",
    "sdpa": "the WebUI's attention is used",
    "torch_compile": "the WebUI's shared model is not compiled (CLI only)",
    "dynamo_backend": "the WebUI's shared model is not compiled (CLI only)",
    "subsets": "inline [[subsets]] are read by the CLI and the HTTP API; in the tab, put them in a dataset TOML "
               "([[datasets.subsets]]) and set dataset_config",
}

# Dropdowns: field -> (choices, custom values allowed)
CHOICES: Dict[str, Tuple[List[str], bool]] = {
    "network_module": (["networks.lora", "networks.dylora", "lycoris.kohya"], True),
    "optimizer_type": (["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation",
                        "DAdaptAdam", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD",
                        "Prodigy", "AdaFactor"], True),
    "lr_scheduler": (["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "adafactor"], True),
    "max_token_length": (["75", "150", "225"], False),
    "mixed_precision": (["no", "fp16", "bf16"], False),
    "save_precision": (["float", "fp16", "bf16"], False),
    "sample_sampler": (["ddim"], True),
}

# Multi-line text
LINES = {"sample_prompts": 3}


def _live_choices() -> None:
    """Take the network, optimizer and schedule names from the registries when they import."""
    try:
        from ..optim import SCHEDULE_NAMES, known_names
        from ..run import NETWORK_MODULES
        CHOICES["network_module"] = (list(NETWORK_MODULES), True)
        CHOICES["optimizer_type"] = (list(known_names()), True)
        CHOICES["lr_scheduler"] = (list(SCHEDULE_NAMES), True)
    except Exception:  # keep the static lists
        log.debug("lora_trainer: using the static choice lists", exc_info=True)


def ui_fields() -> List[str]:
    return [name for _, _, rows, _ in SECTIONS for row in rows for name in row]


_HINTS = typing.get_type_hints(TrainConfig)


def kind(name: str) -> str:
    """bool | int | float | optional | list | str | choice: which widget and which conversion."""
    if name in CHOICES:
        return "choice"
    t = _HINTS[name]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union and type(None) in args:
        return "optional"
    if origin in (list, List):
        return "list"
    return {bool: "bool", int: "int", float: "float"}.get(t, "str")


def help_text(name: str) -> str:
    return field_help()[name]["help"]


def to_ui(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    k = kind(name)
    if k == "list":
        return " ".join(shlex.quote(v) for v in value or [])
    if k == "optional":
        return "" if value is None else f"{value:.10g}" if isinstance(value, float) else str(value)
    if k == "choice" or k == "str":
        return "" if value is None else str(value)
    return value


def from_ui(name: str, value: Any) -> Any:
    """A widget value as TrainConfig.from_dict takes it ("" = not set for optional fields)."""
    k = kind(name)
    if k == "list":
        try:
            return shlex.split(value or "")
        except ValueError:  # an unbalanced quote: keep the words, let validation name the bad one
            return (value or "").split()
    if k == "optional":
        s = str(value if value is not None else "").strip()
        if s == "":
            return ""
        typ = typing.get_args(_HINTS[name])[0]
        try:
            f = float(s)
            return int(f) if typ is int and f.is_integer() else f
        except ValueError:
            return s  # from_dict names the field and the bad value
    if k == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_from_ui(values: Dict[str, Any]) -> TrainConfig:
    """The config the widgets describe; hidden fields keep their defaults (the WebUI decides them).
    Raises ConfigError (a UserError) naming each bad value."""
    return TrainConfig.from_dict({name: from_ui(name, v) for name, v in values.items()})


def ignored_in_webui(cfg: TrainConfig) -> List[str]:
    """Hidden fields a loaded file set to something other than the default: ``name = value (why)``."""
    default = TrainConfig()
    return [f"{n} = {getattr(cfg, n)!r} ({why})" for n, why in HIDDEN.items()
            if getattr(cfg, n) != getattr(default, n)]


def ui_values(cfg: TrainConfig) -> Dict[str, Any]:
    return {name: to_ui(name, getattr(cfg, name)) for name in ui_fields()}
