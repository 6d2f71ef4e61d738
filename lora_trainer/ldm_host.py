"""A host over Stability's LDM ``LatentDiffusion`` (SD1 epsilon, SD2 epsilon/v): the same classes the
WebUI loads. Used by the standalone CLI and by the tests. Imports ``ldm`` lazily.

Conditioning follows the WebUI's inference path: captions are cut into 75-token chunks, each chunk
is wrapped in BOS/EOS and padded to 77, encoded separately, and the chunks are concatenated. Clip
skip takes an earlier hidden layer and applies the final layer norm (SD1, as the WebUI does).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UserError
from .host import BaseHost, fingerprint_module
from .text_tokens import chunked_ids, hf_clip_tokenizer_ids, openclip_ids, openclip_special

log = logging.getLogger(__name__)


def fix_pytorch_lightning() -> None:
    """ldm imports ``pytorch_lightning.utilities.distributed``, gone in PL >= 2 (the WebUI aliases it too)."""
    import sys
    try:
        import pytorch_lightning.utilities.distributed  # noqa: F401
    except ImportError:
        try:
            import pytorch_lightning.utilities.rank_zero as rz
            sys.modules["pytorch_lightning.utilities.distributed"] = rz
        except ImportError:
            pass


@contextlib.contextmanager
def _text_encoder_from_config_only():
    """Build HF CLIP text models from their config alone: the checkpoint brings the weights (as the
    WebUI does), so nothing is read from, or fetched into, the Hugging Face cache but config and tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel
    original = CLIPTextModel.from_pretrained

    def from_config(name, *args, **kwargs):
        return CLIPTextModel(CLIPTextConfig.from_pretrained(name))

    CLIPTextModel.from_pretrained = from_config
    try:
        yield
    finally:
        CLIPTextModel.from_pretrained = original


def instantiate(config: Dict[str, Any], weights_from_checkpoint: bool = False) -> nn.Module:
    """Build a LatentDiffusion from an OmegaConf-compatible dict, quietly (ldm prints to stdout)."""
    import warnings
    from omegaconf import OmegaConf
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightning/timm deprecation notices on import
        fix_pytorch_lightning()
        from ldm.util import instantiate_from_config
        ctx = _text_encoder_from_config_only() if weights_from_checkpoint else contextlib.nullcontext()
        with ctx:
            return instantiate_from_config(OmegaConf.create(config).model)


class LDMHost(BaseHost):
    supports_sampling = True
    supports_compile = True

    def __init__(self, model: nn.Module, *, name: str = "model", model_hash: str = "", device: str = "cpu",
                 vae_name: str = ""):
        super().__init__()
        self.model = model
        self.device = torch.device(device)
        self.unet = model.model.diffusion_model
        self.cond = model.cond_stage_model
        self.vae = model.first_stage_model
        cls = type(self.cond).__name__
        if cls == "FrozenOpenCLIPEmbedder":
            self.model_kind, self.te_kind = "sd2", "openclip"
        elif cls == "FrozenCLIPEmbedder":
            self.model_kind, self.te_kind = "sd1", "hfclip"
        else:
            raise UserError(f"Unsupported text encoder {cls}: the LDM host trains SD1 and SD2 models.")
        self.text_encoders = [("lora_te", self.cond)]
        self.prediction_type = "v" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = model.alphas_cumprod.detach().float().to(self.device)
        self.weight_dtype = next(self.unet.parameters()).dtype
        self.scale_factor = float(model.scale_factor)
        self._name, self._hash, self._vae_name = name, model_hash, vae_name
        self._vae_fp: Optional[str] = None

    def extra_modules(self) -> List[nn.Module]:
        return [self.vae]

    def attention(self, sdpa: bool = True):
        """ldm's attention is einsum + softmax; with ``sdpa`` (the config's) the UNet's attention runs
        through torch's scaled_dot_product_attention for the run."""
        from .attention import sdpa_attention
        return sdpa_attention(self.unet, sdpa)

    # -------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, next(self.vae.parameters()).dtype)
        posterior = self.vae.encode(x)
        return (posterior.mode() * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(next(self.vae.parameters()).dtype) / self.scale_factor
        return self.vae.decode(z).float().clamp(-1, 1)

    # -------------------------------------------------------------- text
    def tokenize(self, captions: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
        """(B, chunks, 77) token ids; chunks = max_token_length / 75, longer captions are cut."""
        if self.te_kind == "hfclip":
            tok = self.cond.tokenizer
            return chunked_ids(captions, hf_clip_tokenizer_ids(tok), tok.bos_token_id, tok.eos_token_id,
                               tok.eos_token_id, max_token_length)
        return chunked_ids(captions, openclip_ids, *openclip_special(), max_token_length)

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        b, n, length = tokens.shape
        flat = tokens.reshape(b * n, length).to(self.device)
        if self.te_kind == "hfclip":
            tm = self.cond.transformer
            if clip_skip <= 1:
                z = tm(input_ids=flat).last_hidden_state
            else:
                hs = tm(input_ids=flat, output_hidden_states=True).hidden_states[-clip_skip]
                z = tm.text_model.final_layer_norm(hs)
        else:
            z = self.cond.encode_with_transformer(flat)
        return z.reshape(b, n * length, z.shape[-1])

    # -------------------------------------------------------------- UNet
    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, context=cond)

    # -------------------------------------------------------------- info
    def model_info(self) -> Dict[str, str]:
        return {"sd_model_name": self._name, "sd_model_hash": self._hash[:10], "sd_model_sha256": self._hash,
                "vae_name": self._vae_name}

    def vae_fingerprint(self) -> str:
        if self._vae_fp is None:
            self._vae_fp = fingerprint_module(self.vae.encoder) + fingerprint_module(self.vae.quant_conv)[:8]
        return self._vae_fp


# ------------------------------------------------------------------ loading checkpoints
def load_checkpoint(path: str, config: str = "", *, device: str = "cpu", vae: str = "",
                    v2: bool = False, v_parameterization: bool = False, zero_terminal_snr: bool = False):
    """A host over a checkpoint file + its yaml (``config``). Without a yaml, the one beside the
    checkpoint (same stem) is used. SDXL checkpoints (found by their keys, or ``config = "sdxl"``) get
    the SDXL host; SD1/SD2 the LDM host."""
    from .io.hashes import sha256_file
    ckpt = Path(path)
    if not ckpt.is_file():
        raise UserError(f"pretrained_model_name_or_path {path!r} does not exist: point it at a .safetensors or .ckpt file.")
    from .sdxl_host import is_sdxl_checkpoint, load_sdxl
    keys = checkpoint_keys(ckpt)
    if config == "sdxl" or is_sdxl_checkpoint(keys):
        yaml = Path(config) if config not in ("", "sdxl") else ckpt.with_suffix(".yaml")
        ycfg = None
        if config != "sdxl" and yaml.is_file():
            from omegaconf import OmegaConf
            ycfg = OmegaConf.to_container(OmegaConf.load(yaml), resolve=True)
            _register_openclip_configs(yaml.parent)
        return load_sdxl(ckpt, load_state_dict(ckpt), ycfg, device=device, vae=vae,
                         v_parameterization=v_parameterization, zero_terminal_snr=zero_terminal_snr)
    from .ldm_configs import KNOWN, known_config
    if config in KNOWN:
        cfg = known_config(config)
    else:
        yaml = Path(config) if config else ckpt.with_suffix(".yaml")
        if not yaml.is_file():
            raise UserError(f"No model config for {ckpt.name}: set model_config to sd1, sd2 or sd2-v (v-prediction), "
                            f"or to an LDM yaml, or put {ckpt.stem}.yaml beside the checkpoint.")
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(OmegaConf.load(yaml), resolve=True)
        _register_openclip_configs(yaml.parent)
    params = cfg["model"]["params"]
    unet_params = params.get("unet_config", {}).get("params", {})
    unet_params["use_fp16"] = False         # the trainer's autocast decides precision
    cond_params = params.get("cond_stage_config", {}).setdefault("params", {})
    if params.get("cond_stage_config", {}).get("target", "").endswith("FrozenOpenCLIPEmbedder"):
        cond_params["version"] = None       # no pretrained download: the checkpoint brings the weights
    if v_parameterization:
        params["parameterization"] = "v"
    params.setdefault("cond_stage_config", {}).setdefault("params", {})["device"] = device
    model = instantiate(cfg, weights_from_checkpoint=True)
    sd = load_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    core_missing = [k for k in missing if k.startswith(("model.diffusion_model.", "cond_stage_model.",
                                                        "first_stage_model.")) and not k.endswith("position_ids")]
    if core_missing:
        raise UserError(f"{ckpt.name} does not fit {yaml.name}: {len(core_missing)} weights missing "
                        f"(e.g. {core_missing[0]}). Use the yaml made for this checkpoint.")
    if vae:
        vsd = load_state_dict(Path(vae))
        vsd = {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k: v for k, v in vsd.items()}
        model.first_stage_model.load_state_dict(vsd, strict=False)
    model.to(device)
    host = LDMHost(model, name=ckpt.name, model_hash=sha256_file(ckpt), device=device,
                   vae_name=Path(vae).name if vae else "")
    if zero_terminal_snr:
        from .train.noise import rescale_zero_terminal_snr
        host.alphas_cumprod = rescale_zero_terminal_snr(host.alphas_cumprod)
        host.zero_terminal_snr = True
    return host


def _register_openclip_configs(folder: Path) -> None:
    """Tiny OpenCLIP architectures made by lora_trainer.tiny (``*.openclip.json`` beside a yaml)."""
    for j in folder.glob("*.openclip.json"):
        import open_clip
        named = j.with_name(j.name[: -len(".openclip.json")] + ".json")
        if named.is_file():
            open_clip.add_model_config(str(named))


def checkpoint_keys(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise UserError(f"{path.name} is not a readable safetensors file ({e}): re-download or re-save it.") from None
    return list(load_state_dict(path).keys())


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)
