"""Ready settings for 8 / 12 / 24 GB cards, for a character or a style, with the guide's numbers.

A preset is a set of :class:`~lora_trainer.config.TrainConfig` field overrides and a one-line
description; applying one overwrites exactly those fields and leaves the rest (dataset, output name,
seed, ...) as they were. Every preset exists in two optimizer flavours:

- ``AdamW8bit`` (the guide's default): learning rates by hand. UNet 1e-4 at dim = alpha, ten times
  that at alpha 1 / dim 64; text encoder = UNet / 2-3; a decaying schedule with 5-10 % warm-up.
- adaptive (``DAdaptAdam`` with ``decouple=True weight_decay=0.01 betas=0.9,0.99``): one learning
  rate of 1.0 for both parts and the ``constant`` schedule (which takes no warm-up).

What the card size changes: resolution (the strongest quality lever), batch size (as large as memory
allows) and gradient checkpointing (less memory, slower). What the subject changes: alpha (characters
1-16 at dim 64, styles dim/1-dim/4), keep_tokens (1 keeps a character's trigger word first, 0 for
styles), LoCon conv layers (dim/2-4, good for styles), the schedule (restarts for long style runs)
and the epochs (characters 2000-7000 image-iterations at 300-500 per epoch, styles 8000-12000 at
400-600 per epoch). Shared by all: dim 64, min-SNR gamma 5, 225 tokens, clip skip 2 (anime bases,
the guide's audience; 1 for realistic ones), bf16 training and saving (RTX 30xx and newer; fp16
otherwise), every epoch saved and none deleted, latents cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from .config import TrainConfig
from .errors import UserError

CARDS = (8, 12, 24)
SUBJECTS = ("character", "style")
OPTIMIZERS = ("AdamW8bit", "adaptive")

ADAMW8BIT_ARGS = ["weight_decay=0.01", "betas=0.9,0.999"]
DADAPT_ADAM_ARGS = ["decouple=True", "weight_decay=0.01", "betas=0.9,0.99"]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    card_gb: int = 0
    subject: str = ""
    optimizer: str = ""


# Shared by every preset.
COMMON: Dict[str, Any] = dict(
    network_module="networks.lora", network_dim=64, min_snr_gamma=5.0, max_token_length=225, clip_skip=2,
    shuffle_caption=True, mixed_precision="bf16", save_precision="bf16", save_every_n_epochs=1,
    save_last_n_epochs=None, cache_latents=True, cache_latents_to_disk=False, enable_bucket=True,
    bucket_reso_steps=64, bucket_no_upscale=False, gradient_accumulation_steps=1, noise_offset=None,
    max_train_steps=None, network_train_unet_only=False, network_train_text_encoder_only=False,
)

# What the card's memory allows.
CARD: Dict[int, Dict[str, Any]] = {
    8: dict(resolution="512", min_bucket_reso=256, max_bucket_reso=1024, train_batch_size=2,
            gradient_checkpointing=True),
    12: dict(resolution="768", min_bucket_reso=256, max_bucket_reso=1536, train_batch_size=2,
             gradient_checkpointing=True),
    24: dict(resolution="768", min_bucket_reso=256, max_bucket_reso=1536, train_batch_size=4,
             gradient_checkpointing=False),
}
CARD_NOTE = {8: "512 px, batch 2, gradient checkpointing", 12: "768 px, batch 2, gradient checkpointing",
             24: "768 px, batch 4"}

# What the subject needs, per optimizer flavour.
SUBJECT: Dict[str, Dict[str, Dict[str, Any]]] = {
    "character": {
        # alpha 1 at dim 64 -> UNet lr 1e-3 (the guide's pair); TE = UNet / 2
        "AdamW8bit": dict(network_alpha=1.0, network_args=[], learning_rate=1e-3, unet_lr=1e-3,
                          text_encoder_lr=5e-4, lr_scheduler="cosine", lr_warmup_steps=0.05,
                          lr_scheduler_num_cycles=1, keep_tokens=1, max_train_epochs=10),
        # adaptive optimizers pick too large a step at a low alpha: the top of the 1-16 range
        "adaptive": dict(network_alpha=16.0, network_args=[], learning_rate=1.0, unet_lr=None,
                         text_encoder_lr=None, lr_scheduler="constant", lr_warmup_steps=0.0,
                         lr_scheduler_num_cycles=1, keep_tokens=1, max_train_epochs=10),
    },
    "style": {
        # dim = alpha -> lr 1e-4, TE = UNet / 2; LoCon conv_dim = dim / 2; restarts for a long run
        "AdamW8bit": dict(network_alpha=64.0, network_args=["conv_dim=32", "conv_alpha=32"], learning_rate=1e-4,
                          unet_lr=1e-4, text_encoder_lr=5e-5, lr_scheduler="cosine_with_restarts",
                          lr_warmup_steps=0.05, lr_scheduler_num_cycles=4, keep_tokens=0, max_train_epochs=20),
        "adaptive": dict(network_alpha=64.0, network_args=["conv_dim=32", "conv_alpha=32"], learning_rate=1.0,
                         unet_lr=None, text_encoder_lr=None, lr_scheduler="constant", lr_warmup_steps=0.0,
                         lr_scheduler_num_cycles=1, keep_tokens=0, max_train_epochs=20),
    },
}
OPTIMIZER: Dict[str, Dict[str, Any]] = {
    "AdamW8bit": dict(optimizer_type="AdamW8bit", optimizer_args=list(ADAMW8BIT_ARGS)),
    "adaptive": dict(optimizer_type="DAdaptAdam", optimizer_args=list(DADAPT_ADAM_ARGS)),
}
SUBJECT_NOTE = {
    "character": {"AdamW8bit": "dim 64 / alpha 1, lr 1e-3 (TE 5e-4), cosine, keep the trigger tag, 10 epochs",
                  "adaptive": "dim 64 / alpha 16, DAdaptAdam lr 1.0, constant, keep the trigger tag, 10 epochs"},
    "style": {"AdamW8bit": "dim 64 / alpha 64 + LoCon 32, lr 1e-4 (TE 5e-5), cosine with 3 restarts, 20 epochs",
              "adaptive": "dim 64 / alpha 64 + LoCon 32, DAdaptAdam lr 1.0, constant, 20 epochs"},
}


def preset_name(card_gb: int, subject: str, optimizer: str = "AdamW8bit") -> str:
    suffix = "" if optimizer == "AdamW8bit" else " (adaptive)"
    return f"{card_gb} GB {subject}{suffix}"


def _build() -> Dict[str, Preset]:
    out: Dict[str, Preset] = {}
    for opt in OPTIMIZERS:
        for card in CARDS:
            for subject in SUBJECTS:
                name = preset_name(card, subject, opt)
                overrides = {**COMMON, **CARD[card], **SUBJECT[subject][opt], **OPTIMIZER[opt]}
                desc = f"{card} GB card, {subject}: {CARD_NOTE[card]}; {SUBJECT_NOTE[subject][opt]}."
                out[name] = Preset(name, desc, overrides, card, subject, opt)
    return out


PRESETS: Dict[str, Preset] = _build()


# ------------------------------------------------------------------ SDXL (Pony, Illustrious, NoobAI, ...)
# SDXL trains at 1024² with buckets 512-2048; the UNet only, with the text encoders' outputs cached and
# the encoders off the GPU (several GB saved: training both encoders of SDXL rarely helps a LoRA).
# Measured with sd-scripts on one H200 (issue 11): SDXL 1024² UNet-only bf16 took 14.2 GiB at batch 1
# and 38.8 GiB at batch 4 without gradient checkpointing, so every SDXL preset checkpoints.
SDXL_CARDS = (12, 16, 24)
SDXL_OPTIMIZERS = ("AdamW8bit", "Prodigy")
PRODIGY_ARGS = ["decouple=True", "weight_decay=0.01", "betas=0.9,0.99", "use_bias_correction=True",
                "safeguard_warmup=True", "d_coef=1"]
SDXL_COMMON: Dict[str, Any] = dict(
    COMMON, network_dim=32, clip_skip=1, resolution="1024", min_bucket_reso=512, max_bucket_reso=2048,
    network_train_unet_only=True, cache_text_encoder_outputs=True, gradient_checkpointing=True,
)
SDXL_CARD: Dict[int, Dict[str, Any]] = {12: dict(train_batch_size=1), 16: dict(train_batch_size=2),
                                        24: dict(train_batch_size=4)}
SDXL_SUBJECT: Dict[str, Dict[str, Dict[str, Any]]] = {
    "character": {
        "AdamW8bit": dict(network_alpha=16.0, network_args=[], learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=None,
                          lr_scheduler="cosine", lr_warmup_steps=0.05, lr_scheduler_num_cycles=1, keep_tokens=1,
                          max_train_epochs=10),
        "Prodigy": dict(network_alpha=16.0, network_args=[], learning_rate=1.0, unet_lr=None, text_encoder_lr=None,
                        lr_scheduler="constant", lr_warmup_steps=0.0, lr_scheduler_num_cycles=1, keep_tokens=1,
                        max_train_epochs=10),
    },
    "style": {
        "AdamW8bit": dict(network_alpha=32.0, network_args=["conv_dim=16", "conv_alpha=16"], learning_rate=1e-4,
                          unet_lr=1e-4, text_encoder_lr=None, lr_scheduler="cosine_with_restarts",
                          lr_warmup_steps=0.05, lr_scheduler_num_cycles=4, keep_tokens=0, max_train_epochs=20),
        "Prodigy": dict(network_alpha=32.0, network_args=["conv_dim=16", "conv_alpha=16"], learning_rate=1.0,
                        unet_lr=None, text_encoder_lr=None, lr_scheduler="constant", lr_warmup_steps=0.0,
                        lr_scheduler_num_cycles=1, keep_tokens=0, max_train_epochs=20),
    },
}
SDXL_OPTIMIZER = {"AdamW8bit": dict(optimizer_type="AdamW8bit", optimizer_args=list(ADAMW8BIT_ARGS)),
                  "Prodigy": dict(optimizer_type="Prodigy", optimizer_args=list(PRODIGY_ARGS))}
SDXL_NOTE = {"character": {"AdamW8bit": "dim 32 / alpha 16, lr 1e-4, cosine, keep the trigger tag, 10 epochs",
                           "Prodigy": "dim 32 / alpha 16, Prodigy lr 1.0, constant, keep the trigger tag, 10 epochs"},
             "style": {"AdamW8bit": "dim 32 / alpha 32 + LoCon 16, lr 1e-4, cosine with 3 restarts, 20 epochs",
                       "Prodigy": "dim 32 / alpha 32 + LoCon 16, Prodigy lr 1.0, constant, 20 epochs"}}


def sdxl_preset_name(card_gb: int, subject: str, optimizer: str = "AdamW8bit") -> str:
    return f"SDXL {card_gb} GB {subject}" + ("" if optimizer == "AdamW8bit" else f" ({optimizer})")


def _build_sdxl() -> Dict[str, Preset]:
    out: Dict[str, Preset] = {}
    for opt in SDXL_OPTIMIZERS:
        for card in SDXL_CARDS:
            for subject in SUBJECTS:
                name = sdxl_preset_name(card, subject, opt)
                overrides = {**SDXL_COMMON, **SDXL_CARD[card], **SDXL_SUBJECT[subject][opt], **SDXL_OPTIMIZER[opt]}
                desc = (f"SDXL on a {card} GB card, {subject}: 1024 px (buckets 512-2048), batch "
                        f"{SDXL_CARD[card]['train_batch_size']}, gradient checkpointing, UNet only with cached "
                        f"text-encoder outputs; {SDXL_NOTE[subject][opt]}.")
                out[name] = Preset(name, desc, overrides, card, subject, opt)
    return out


SDXL_PRESETS: Dict[str, Preset] = _build_sdxl()


def preset_names(model_kind: str = "sd1") -> List[str]:
    """The presets for a model kind (sd1/sd2: the guide's; sdxl: the SDXL ones)."""
    return list(SDXL_PRESETS if model_kind == "sdxl" else PRESETS)


def get_preset(name: str) -> Preset:
    p = PRESETS.get(name) or SDXL_PRESETS.get(name)
    if p is None:
        raise UserError(f"Unknown preset {name!r}: choose one of {', '.join(list(PRESETS) + list(SDXL_PRESETS))}.")
    return p


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    """A copy of ``cfg`` with the preset's fields overwritten (lists copied, never shared)."""
    p = get_preset(name)
    return cfg.replace(**{k: (list(v) if isinstance(v, list) else v) for k, v in p.overrides.items()})


def describe(name: str) -> str:
    return get_preset(name).description
