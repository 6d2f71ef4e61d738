"""A host over a single-file SDXL checkpoint (the sgm key layout SDXL models are shared in), for the
standalone CLI and the tests.

Model code: the UNet is diffusers' (``sdxl_unet``: there is no ``sgm`` on PyPI; diffusers is the
field's maintained implementation) seen under sgm's names; CLIP-L is transformers' ``CLIPTextModel``;
OpenCLIP bigG is built from open_clip's ``Transformer``; the VAE is Stability's ``ldm`` AutoencoderKL
(the same class SD1 uses; SDXL's VAE has its layout). Every part loads the checkpoint's own keys
strictly, so a file that does not fit is refused with the key that differs.

Conditioning is SDXL's: ``crossattn`` = CLIP-L layer ``layer_idx`` (penultimate) and bigG's penultimate
layer side by side (per 75-token chunk, chunks concatenated); ``vector`` = bigG's pooled embedding of the
first chunk + embeddings of original size, crop offset and target size (``time_ids``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UserError
from .host import BaseHost, fingerprint_module
from .text_tokens import chunked_ids, hf_clip_tokenizer_ids, openclip_ids, openclip_special

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."


def is_sdxl_checkpoint(keys) -> bool:
    return any(k.startswith(TE2_PREFIX) for k in keys) and any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys)


def sdxl_alphas_cumprod(zero_terminal_snr: bool = False, n: int = 1000) -> torch.Tensor:
    """SDXL's DDPM schedule (sgm's LegacyDDPMDiscretization: linear in sqrt(beta), 0.00085..0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    acp = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        from .train.noise import rescale_zero_terminal_snr
        acp = rescale_zero_terminal_snr(acp)
    return acp.float()


def default_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """Size conditioning for a generation at the latents' size: original = target = (H, W), crop (0, 0)."""
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device).repeat(latents.shape[0], 1)


class SDXLHost(BaseHost):
    model_kind = "sdxl"
    supports_sampling = True
    supports_compile = True

    def __init__(self, unet, te1, te2, vae, *, scale_factor: float = 0.13025, prediction_type: str = "epsilon",
                 zero_terminal_snr: bool = False, device: str = "cpu", name: str = "model", model_hash: str = "",
                 vae_name: str = ""):
        super().__init__()
        self.device = torch.device(device)
        self.unet, self.te1, self.te2, self.vae = unet, te1, te2, vae
        self.text_encoders = [("lora_te1", te1), ("lora_te2", te2)]
        self.prediction_type = prediction_type
        self.zero_terminal_snr = zero_terminal_snr
        self.alphas_cumprod = sdxl_alphas_cumprod(zero_terminal_snr).to(self.device)
        self.weight_dtype = next(unet.parameters()).dtype
        self.scale_factor = scale_factor
        self._name, self._hash, self._vae_name = name, model_hash, vae_name
        self._vae_fp: Optional[str] = None

    def extra_modules(self) -> List[nn.Module]:
        return [self.vae]

    def checkpoint_blocks(self) -> List[nn.Module]:
        u = self.unet.diffusers_unet
        return list(u.down_blocks) + [u.mid_block] + list(u.up_blocks)

    # -------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, next(self.vae.parameters()).dtype)
        return (self.vae.encode(x).mode() * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(next(self.vae.parameters()).dtype) / self.scale_factor
        return self.vae.decode(z).float().clamp(-1, 1)

    # -------------------------------------------------------------- text
    def tokenize(self, captions: Sequence[str], max_token_length: int = 75):
        tok = self.te1.tokenizer
        ids1 = chunked_ids(captions, hf_clip_tokenizer_ids(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.eos_token_id, max_token_length)
        ids2 = chunked_ids(captions, openclip_ids, *openclip_special(), max_token_length)
        return ids1, ids2

    def encode_tokens(self, tokens, clip_skip: int = 1) -> Dict[str, torch.Tensor]:
        ids1, ids2 = tokens
        b, n, length = ids1.shape
        z1 = self.te1.encode(ids1.reshape(b * n, length).to(self.device))
        z2, pooled = self.te2.encode(ids2.reshape(b * n, length).to(self.device))
        crossattn = torch.cat([z1, z2.to(z1.dtype)], dim=2).reshape(b, n * length, -1)
        pooled = pooled.reshape(b, n, -1)[:, 0]   # the first chunk's, as the WebUI does
        return {"crossattn": crossattn, "pooled": pooled}

    # -------------------------------------------------------------- UNet
    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = default_time_ids(noisy_latents)
        return self.unet(noisy_latents, timesteps, cond["crossattn"], cond["pooled"], time_ids.to(noisy_latents.device))

    # -------------------------------------------------------------- info
    def model_info(self) -> Dict[str, str]:
        return {"sd_model_name": self._name, "sd_model_hash": self._hash[:10], "sd_model_sha256": self._hash,
                "vae_name": self._vae_name}

    def vae_fingerprint(self) -> str:
        if self._vae_fp is None:
            self._vae_fp = fingerprint_module(self.vae.encoder) + fingerprint_module(self.vae.quant_conv)[:8]
        return self._vae_fp


# ------------------------------------------------------------------ loading
def _sub(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, sd: Dict[str, torch.Tensor], what: str, ckpt: str, optional=()) -> None:
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if not any(k.endswith(o) for o in optional))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        first = (missing or unexpected or bad)[0]
        raise UserError(f"{ckpt}: its {what} does not have SDXL's layout ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(bad)} mis-shaped weights, e.g. {first}). Use an SDXL base checkpoint "
                        "(Pony, Illustrious, NoobAI and other SDXL fine-tunes are), or its yaml.")
    module.load_state_dict(sd, strict=False)


def sdxl_params_from_yaml(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What the CLI needs from an sgm DiffusionEngine yaml: UNet params, embedder params, scale factor,
    VAE ddconfig, prediction type."""
    p = cfg["model"]["params"]
    embs = p.get("conditioner_config", {}).get("params", {}).get("emb_models", [])
    te1 = next((e.get("params", {}) for e in embs if e.get("target", "").endswith("FrozenCLIPEmbedder")), {})
    te2 = next((e.get("params", {}) for e in embs if e.get("target", "").endswith("FrozenOpenCLIPEmbedder2")), {})
    scaling = p.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", "")
    return {"unet": p["network_config"]["params"], "te1": te1, "te2": te2,
            "scale_factor": float(p.get("scale_factor", 0.13025)),
            "ddconfig": p.get("first_stage_config", {}).get("params", {}).get("ddconfig"),
            "v": scaling.endswith("VScaling")}


SDXL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_vae(ddconfig: Dict[str, Any]) -> nn.Module:
    import contextlib
    import io
    from .ldm_host import fix_pytorch_lightning
    fix_pytorch_lightning()
    with contextlib.redirect_stdout(io.StringIO()):
        from ldm.models.autoencoder import AutoencoderKL
        dd = {k: v for k, v in ddconfig.items() if k != "attn_type"}
        return AutoencoderKL(ddconfig=dd, embed_dim=4, lossconfig={"target": "torch.nn.Identity"})


def load_sdxl(path: Path, sd: Dict[str, torch.Tensor], yaml_cfg: Optional[Dict[str, Any]], *, device: str = "cpu",
              vae: str = "", v_parameterization: bool = False, zero_terminal_snr: bool = False) -> SDXLHost:
    from .io.hashes import sha256_file
    from .sdxl_text import build_clip_l, build_openclip_g
    from .sdxl_unet import SDXL_BASE_UNET, build_unet
    params = sdxl_params_from_yaml(yaml_cfg) if yaml_cfg else {
        "unet": SDXL_BASE_UNET, "te1": {}, "te2": {}, "scale_factor": 0.13025, "ddconfig": None, "v": False}
    name = path.name
    unet = build_unet(params["unet"])
    _load_strict(unet, _sub(sd, UNET_PREFIX), "UNet", name)
    t1 = params["te1"]
    te1 = build_clip_l(t1.get("version", "openai/clip-vit-large-patch14"), t1.get("layer", "hidden"),
                       int(t1.get("layer_idx", 11) if t1.get("layer_idx") is not None else 11))
    _load_strict(te1, _sub(sd, TE1_PREFIX), "CLIP-L text encoder", name, optional=("position_ids",))
    te2 = build_openclip_g(sd, TE2_PREFIX, params["te2"].get("arch", "ViT-bigG-14"))
    _load_strict(te2.model, _sub(sd, TE2_PREFIX), "OpenCLIP text encoder", name, optional=("logit_scale",))
    vae_model = build_vae(params["ddconfig"] or SDXL_VAE_DDCONFIG)
    vsd = _sub(sd, VAE_PREFIX)
    if vae:
        from .ldm_host import load_state_dict
        vfile = load_state_dict(Path(vae))
        vsd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in vfile.items()}
    _load_strict(vae_model, vsd, "VAE", Path(vae).name if vae else name)
    for m in (unet, te1, te2, vae_model):
        m.to(device).eval().requires_grad_(False)
    prediction = "v" if (v_parameterization or params["v"]) else "epsilon"
    return SDXLHost(unet, te1, te2, vae_model, scale_factor=params["scale_factor"], prediction_type=prediction,
                    zero_terminal_snr=zero_terminal_snr, device=device, name=name,
                    model_hash=sha256_file(path), vae_name=Path(vae).name if vae else "")
