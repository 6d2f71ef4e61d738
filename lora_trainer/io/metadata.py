"""kohya ``ss_*`` metadata (and ``modelspec.*``) for a trained LoRA, as every LoRA tool reads it.

Values are strings (safetensors requires it); dicts are JSON. Each saved file gets its own
``ss_output_name`` (the WebUI drops an alias shared by two files), ``ss_epoch`` and ``ss_steps``.
"""
from __future__ import annotations

import json
import random
import time
from typing import Any, Dict, Optional

from .. import __version__

BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def base_model_version(model_kind: str, prediction_type: str) -> str:
    v = BASE_VERSIONS[model_kind]
    return v + "_v" if prediction_type == "v" and model_kind != "sdxl" else v


def build_metadata(cfg, *, model_kind: str, prediction_type: str, model_info: Dict[str, str], dataset_dirs: Dict,
                   tag_frequency: Dict, bucket_info: Optional[Dict], num_train_images: int, num_batches_per_epoch: int,
                   num_epochs: int, max_train_steps: int, warmup_steps: int, network_args: Dict[str, Any],
                   optimizer_desc: str, started_at: float, zero_terminal_snr: bool = False) -> Dict[str, str]:
    w, h = cfg.resolution_wh()
    arch = ARCHITECTURES[model_kind]
    if model_kind == "sd2" and prediction_type == "v":
        arch = "stable-diffusion-v2-768-v"
    md: Dict[str, Any] = {
        "ss_session_id": random.randint(0, 2 ** 32),
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.effective_text_encoder_lr() if cfg.train_text_encoder() else None,
        "ss_unet_lr": cfg.effective_unet_lr() if cfg.train_unet() else None,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha or cfg.network_dim,
        "ss_network_dropout": cfg.network_dropout,
        "ss_network_args": json.dumps({k: str(v) for k, v in network_args.items()}) if network_args else None,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": model_kind == "sd2",
        "ss_base_model_version": base_model_version(model_kind, prediction_type),
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents,
        "ss_seed": cfg.seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount if cfg.multires_noise_iterations else None,
        "ss_zero_terminal_snr": bool(zero_terminal_snr),
        "ss_training_comment": cfg.training_comment or None,
        "ss_optimizer": optimizer_desc,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": f"({w}, {h})",
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
        "ss_max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
        "ss_flip_aug": False,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_bucket_info": json.dumps(bucket_info) if bucket_info else None,
        "ss_sd_model_name": model_info.get("sd_model_name") or None,
        "ss_sd_model_hash": model_info.get("sd_model_hash") or None,
        "ss_new_sd_model_hash": model_info.get("sd_model_sha256") or None,
        "ss_vae_name": model_info.get("vae_name") or None,
        "ss_trainer": f"sd-webui-lora-trainer {__version__}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers" if model_kind != "sdxl" else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if prediction_type == "v" else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
    }
    return {k: str(v) for k, v in md.items() if v is not None}


def per_save(metadata: Dict[str, str], *, output_name: str, epoch: int, steps: int) -> Dict[str, str]:
    md = dict(metadata)
    md["ss_output_name"] = output_name
    md["modelspec.title"] = output_name
    md["ss_epoch"] = str(epoch)
    md["ss_steps"] = str(steps)
    md["ss_training_finished_at"] = str(time.time())
    return md
