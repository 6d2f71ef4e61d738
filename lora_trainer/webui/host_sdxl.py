"""The WebUI host for SDXL: the Host protocol over the sgm ``DiffusionEngine`` the WebUI loaded.

Text goes through the WebUI's own SDXL embedders (``conditioner.embedders[0]`` CLIP-L, ``[1]`` OpenCLIP
bigG: chunking, emphasis and the pooled output of the first chunk as at generation). They are called
one by one rather than through ``conditioner(...)``, whose ``no_grad`` would cut the text-encoder
LoRA's gradients; ``crossattn`` is their outputs side by side. ``vector`` is built per step from the
pooled embedding and the size embedders (original size, crop, target size of each training image),
in the conditioner's own order. The UNet is called through sgm's ``OpenAIWrapper`` (``sd_model.model``),
whose forward pre-hook brings it to the GPU under ``--medvram-sdxl``.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch

from ..errors import UserError
from .host import WebUIHost, medvram_bring

log = logging.getLogger(__name__)

SIZE_KEYS = {"original_size_as_tuple": slice(0, 2), "crop_coords_top_left": slice(2, 4),
             "target_size_as_tuple": slice(4, 6)}


class WebUISDXLHost(WebUIHost):
    def __init__(self, sd_model, clip_skip: int = 1, train_text_encoder: bool = True):
        super().__init__(sd_model, clip_skip=clip_skip, train_text_encoder=train_text_encoder)
        self.conditioner = self.sd_model.conditioner
        self.embedders = list(self.conditioner.embedders)
        self.text_embedders = [e for e in self.embedders if getattr(e, "input_key", None) == "txt"]
        other = [getattr(e, "input_key", None) for e in self.embedders if getattr(e, "input_key", None) != "txt"]
        unknown = [k for k in other if k not in SIZE_KEYS]
        if len(self.text_embedders) != 2 or unknown:
            raise UserError(f"This SDXL model's conditioner ({len(self.text_embedders)} text encoders, other inputs "
                            f"{unknown}) is not SDXL base's: load an SDXL base model (SDXL, Pony, Illustrious, NoobAI).")
        self.text_encoders = [("lora_te1", self.text_embedders[0].wrapped), ("lora_te2", self.text_embedders[1].wrapped)]
        self.cond = self.text_embedders[0]        # token counting for max_token_length
        self.scale_factor = 1.0                   # sgm's encode_first_stage already scales

    def extra_modules(self):
        return [self.vae] + [e for e in self.embedders if e not in self.text_embedders]

    # -------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents with the loaded VAE. SDXL's stock VAE overflows in fp16: a batch that comes out
        non-finite is encoded again with the VAE in float32 for that call (cast back exactly after)."""
        from modules import devices
        z = self.sd_model.encode_first_stage(images.to(self.device, devices.dtype_vae)).float()
        if torch.isfinite(z).all():
            return z
        vae_dtype = next(self.vae.parameters()).dtype
        log.info("the VAE gave NaN latents in %s; encoding this batch in float32", vae_dtype)
        try:
            self.vae.to(torch.float32)
            with devices.without_autocast():
                z = self.sd_model.encode_first_stage(images.to(self.device, torch.float32)).float()
        finally:
            self.vae.to(vae_dtype)
        if not torch.isfinite(z).all():
            raise UserError("The VAE produced NaN latents even in float32: choose another VAE (e.g. sdxl_vae "
                            "fp16-fix) in Settings > VAE.")
        return z

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from modules import devices
        return self.sd_model.decode_first_stage(latents.to(devices.dtype_vae)).float().clamp(-1, 1)

    # -------------------------------------------------------------- text
    def encode_tokens(self, captions: List[str], clip_skip: int = 1) -> Dict[str, torch.Tensor]:
        if getattr(self.sd_model, "lowvram", False):
            medvram_bring(self.conditioner)
        zs, pooled = [], None
        for e in self.text_embedders:
            out = e(captions)
            if isinstance(out, (tuple, list)):
                z, p = out
                pooled = p if pooled is None else pooled
            else:
                z = out
            zs.append(z)
        if pooled is None:
            raise UserError("This SDXL model's text encoders give no pooled embedding: not an SDXL base layout.")
        n = min(z.shape[1] for z in zs)
        return {"crossattn": torch.cat([z[:, :n] for z in zs], dim=2), "pooled": pooled}

    # -------------------------------------------------------------- UNet
    def vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for e in self.embedders:
            key = getattr(e, "input_key", None)
            if key == "txt":
                if e is self.text_embedders[1]:
                    parts.append(pooled)
                continue
            parts.append(e(time_ids[:, SIZE_KEYS[key]].to(pooled.device)).to(pooled.dtype))
        return torch.cat(parts, dim=1)

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        from ..sdxl_host import default_time_ids
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = default_time_ids(noisy_latents)
        c = {"crossattn": cond["crossattn"], "vector": self.vector(cond["pooled"], time_ids)}
        return self.sd_model.model(noisy_latents, timesteps, c)
