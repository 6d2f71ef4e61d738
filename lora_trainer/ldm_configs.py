"""The LDM configs of the standard Stable Diffusion architectures, for checkpoints that come without a
yaml (``model_config = "sd1" | "sd2" | "sd2-v"``). Same values as the inference yamls the WebUI ships,
with the text encoder built from its config only (the checkpoint brings the weights) and ldm's own
gradient checkpointing off (the trainer's replaces it)."""
from __future__ import annotations

import copy
from typing import Any, Dict

_VAE = {"target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
                   "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                                "dropout": 0.0}}}

_COMMON = {"linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
           "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
           "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
           "scale_factor": 0.18215, "use_ema": False}

_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
         "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
         "use_spatial_transformer": True, "transformer_depth": 1, "use_checkpoint": False, "legacy": False}


def _config(unet_extra: Dict[str, Any], cond: Dict[str, Any], **params) -> Dict[str, Any]:
    p = dict(copy.deepcopy(_COMMON), **params)
    p["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": dict(copy.deepcopy(_UNET), **unet_extra)}
    p["first_stage_config"] = copy.deepcopy(_VAE)
    p["cond_stage_config"] = cond
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": p}}


_OPENCLIP = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
             "params": {"arch": "ViT-H-14", "version": None, "freeze": True, "layer": "penultimate"}}

KNOWN: Dict[str, Dict[str, Any]] = {
    "sd1": _config({"num_heads": 8, "context_dim": 768},
                   {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": "openai/clip-vit-large-patch14"}}),
    "sd2": _config({"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024},
                   copy.deepcopy(_OPENCLIP)),
    "sd2-v": _config({"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024},
                     copy.deepcopy(_OPENCLIP), parameterization="v", image_size=96),
}


def known_config(name: str) -> Dict[str, Any]:
    return copy.deepcopy(KNOWN[name])
