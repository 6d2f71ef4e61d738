"""The WebUI host: the Host protocol over ``shared.sd_model`` (SD1/SD2 here; SDXL in ``host_sdxl``), the generation lock, and the
clean-up the WebUI's Lora extension needs (it merges LoRAs into the weights in place and leaves them).

Text goes through the WebUI's own conditioning path (``cond_stage_model(texts)``), so chunking,
emphasis and clip skip behave as at inference; the config's clip skip is set for the run only.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, List, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from ..host import BaseHost, fingerprint_module

log = logging.getLogger(__name__)


def _refuse_unsupported(sd_model) -> str:
    from modules import devices, shared
    if sd_model is None:
        raise UserError("No model is loaded: pick a Stable Diffusion checkpoint at the top of the page first.")
    if getattr(sd_model, "is_sd3", False) or not hasattr(sd_model, "cond_stage_model"):
        raise UserError("The loaded model is SD3 (or another kind this trainer does not know): load an SD1, SD2 or "
                        "SDXL checkpoint to train.")
    if getattr(sd_model, "is_sdxl_inpaint", False) or _unet_in_channels(sd_model) not in (None, 4):
        raise UserError("The loaded model is an inpainting model (its UNet takes a mask): LoRAs are trained on the "
                        "base model. Load the base (non-inpainting) checkpoint.")
    if getattr(sd_model, "is_sdxl", False):
        embedders = list(getattr(getattr(sd_model, "conditioner", None), "embedders", []))
        keys = {getattr(e, "input_key", None) for e in embedders}
        if "aesthetic_score" in keys or sum(hasattr(e, "wrapped") for e in embedders) < 2:
            raise UserError("The loaded model is the SDXL refiner: LoRAs are trained on an SDXL base model (SDXL base, "
                            "Pony, Illustrious, NoobAI, ...). Load one of those.")
    if getattr(shared.cmd_opts, "lowvram", False):
        raise UserError("The WebUI runs with --lowvram, which moves every block off the GPU between forward and "
                        "backward: training cannot work. Restart without --lowvram (with --medvram, train the UNet only).")
    if getattr(devices, "fp8", False) or str(getattr(shared.opts, "fp8_storage", "Disable")) != "Disable":
        raise UserError("FP8 weight storage is on (Settings > Optimizations > FP8 weight): turn it off and reload "
                        "the checkpoint to train.")
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"


def _unet_in_channels(sd_model):
    try:
        return int(sd_model.model.diffusion_model.input_blocks[0][0].in_channels)
    except Exception:
        return None


def medvram_bring(module) -> None:
    """Under --medvram the WebUI moves a module to the GPU in a forward pre-hook; run those hooks for a
    module we call past its forward (SDXL's conditioner, whose embedders we call one by one)."""
    for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
        hook(module, ())


def make_host(sd_model=None, clip_skip: int = 1, train_text_encoder: bool = True):
    """The WebUI host for the loaded model's kind (refusing what cannot be trained)."""
    from modules import shared
    sd_model = sd_model if sd_model is not None else shared.sd_model
    if _refuse_unsupported(sd_model) == "sdxl":
        from .host_sdxl import WebUISDXLHost
        return WebUISDXLHost(sd_model, clip_skip=clip_skip, train_text_encoder=train_text_encoder)
    return WebUIHost(sd_model, clip_skip=clip_skip, train_text_encoder=train_text_encoder)


class WebUIHost(BaseHost):
    supports_sampling = True

    def __init__(self, sd_model=None, clip_skip: int = 1, train_text_encoder: bool = True):
        super().__init__()
        from modules import devices, shared
        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.model_kind = _refuse_unsupported(self.sd_model)
        if (getattr(self.sd_model, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False)) and train_text_encoder:
            raise UserError("The WebUI runs with --medvram/--medvram-sdxl, which moves the text encoders off the GPU "
                            "while the UNet runs: train the UNet only (network_train_unet_only, best with "
                            "cache_text_encoder_outputs) or restart without that flag.")
        self.unet = self.sd_model.model.diffusion_model
        self.cond = self.sd_model.cond_stage_model          # the WebUI's wrapper (chunks, emphasis, clip skip)
        self.text_encoders = [("lora_te", self.cond.wrapped)]
        self.vae = self.sd_model.first_stage_model
        self.prediction_type = "v" if getattr(self.sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.device = devices.device
        self.alphas_cumprod, self.zero_terminal_snr = training_schedule(self.sd_model, self.device)
        self.weight_dtype = next(self.unet.parameters()).dtype
        self.scale_factor = float(self.sd_model.scale_factor)
        self.clip_skip = clip_skip
        self._saved_opts: Dict[str, Any] = {}
        self._vae_fp = None

    def extra_modules(self) -> List[nn.Module]:
        return [self.vae]

    # -------------------------------------------------------------- lock and clean state
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the WebUI's generation lock: generation requests queue behind the run."""
        from modules import call_queue, shared
        with call_queue.queue_lock:
            shared.state.begin(job="train-lora")
            shared.state.textinfo = "Training LoRA: preparing"
            try:
                yield
            finally:
                shared.state.end()

    def prepare(self) -> None:
        from modules import shared
        self._foreign = clean_foreign_networks(self.sd_model)
        self._saved_opts = {"CLIP_stop_at_last_layers": shared.opts.data.get("CLIP_stop_at_last_layers", 1)}
        shared.opts.data["CLIP_stop_at_last_layers"] = self.clip_skip
        super().prepare()

    def restore(self) -> None:
        from modules import shared
        try:
            super().restore()
            for root in self.modules():
                for p in root.parameters():
                    p.grad = None
        finally:
            for k, v in self._saved_opts.items():
                shared.opts.data[k] = v
            self._saved_opts = {}
            foreign, self._foreign = getattr(self, "_foreign", None), None
            if foreign is not None:
                foreign.remerge()
            try:
                from modules import sd_unet
                sd_unet.apply_unet()
            except Exception:  # older/newer WebUIs
                pass

    @contextlib.contextmanager
    def attention(self, sdpa: bool = True):
        """The WebUI's cross-attention optimisation if it trains well (xformers, sdp); the chunked ones
        (Doggettx, V1, InvokeAI, sub-quadratic) keep every chunk for backward and save nothing there, so
        with ``sdpa`` the run uses the WebUI's own "sdp" and the user's choice is put back afterwards."""
        try:
            from modules import sd_hijack
        except ImportError:
            yield None
            return
        current = getattr(sd_hijack, "current_optimizer", None)
        name = getattr(current, "name", None)
        sdp = next((o for o in getattr(sd_hijack, "optimizers", []) if o.name == "sdp"), None)
        if not sdpa or sdp is None or name in ("xformers", "sdp", "sdp-no-mem"):
            yield name
            return
        log.info("training with the WebUI's sdp attention instead of %s (put back after the run)", name or "none")
        sd_hijack.model_hijack.apply_optimizations(sdp.title())
        try:
            yield "sdp"
        finally:
            sd_hijack.model_hijack.apply_optimizations(current.title() if current is not None else "None")

    def _offload(self, kind, modules) -> None:
        if getattr(self.sd_model, "lowvram", False):
            return   # --medvram: the WebUI moves them itself
        super()._offload(kind, modules)

    # -------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        from modules import devices
        x = images.to(self.device, devices.dtype_vae)
        posterior = self.sd_model.encode_first_stage(x)
        z = posterior.mode() if hasattr(posterior, "mode") else posterior
        z = (z.float() * self.scale_factor)
        if not torch.isfinite(z).all():
            raise UserError("The VAE produced NaN latents (an fp16 VAE problem): start the WebUI with --no-half-vae "
                            "or choose another VAE.")
        return z

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from modules import devices
        z = latents.to(devices.dtype_vae) / self.scale_factor
        return self.sd_model.decode_first_stage(z).float().clamp(-1, 1)

    # -------------------------------------------------------------- text (the WebUI's conditioning path)
    def tokenize(self, captions: Sequence[str], max_token_length: int = 75) -> List[str]:
        """Captions stay text (the WebUI's path chunks them); whole trailing tags past
        ``max_token_length`` tokens are dropped, as sd-scripts truncates."""
        from ..dataset.captions import truncate_tags
        return [truncate_tags(c, self._count_tokens, max_token_length) for c in captions]

    def _count_tokens(self, text: str) -> int:
        cache = self.__dict__.setdefault("_token_counts", {})
        if text not in cache:
            cache[text] = len(self.cond.tokenize([text])[0])
        return cache[text]

    def encode_tokens(self, captions: List[str], clip_skip: int = 1) -> torch.Tensor:
        return self.cond(captions)

    # -------------------------------------------------------------- UNet
    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # through ldm's DiffusionWrapper, whose forward pre-hook brings the UNet to the GPU under --medvram
        return self.sd_model.model(noisy_latents, timesteps, c_crossattn=[cond])

    # -------------------------------------------------------------- info
    def model_info(self) -> Dict[str, str]:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        out = {"sd_model_name": getattr(info, "name", "") or "", "sd_model_hash": getattr(info, "hash", "") or "",
               "sd_model_sha256": getattr(info, "sha256", "") or ""}
        try:
            from modules import sd_vae
            out["vae_name"] = sd_vae.get_loaded_vae_name() or ""
        except Exception:
            pass
        return out

    def vae_fingerprint(self) -> str:
        if self._vae_fp is None:
            self._vae_fp = fingerprint_module(self.vae.encoder)
        return self._vae_fp


def training_schedule(sd_model, device):
    """The model's own alpha-bar schedule in float32, rescaled to zero terminal SNR when the WebUI's
    *Noise schedule* setting says so (as the WebUI does before each generation)."""
    from modules import shared
    base = getattr(sd_model, "alphas_cumprod_original", None)
    if base is None:
        base = sd_model.alphas_cumprod
    acp = base.detach().float().to(device)
    ztsnr = str(getattr(shared.opts, "sd_noise_schedule", "Default")) == "Zero Terminal SNR"
    if ztsnr:
        from ..train.noise import rescale_zero_terminal_snr
        acp = rescale_zero_terminal_snr(acp)
    return acp, ztsnr


class ForeignNetworks:
    """The LoRAs the WebUI had merged into the weights when training began, to merge back afterwards
    (bitwise as before: the WebUI's own merge, from its pristine backups, with the same networks)."""

    def __init__(self, networks_module, loaded: list, layers: list):
        self.networks, self.loaded, self.layers = networks_module, loaded, layers

    def remerge(self) -> None:
        if self.networks is None or not self.layers:
            return
        self.networks.loaded_networks[:] = self.loaded
        with torch.no_grad():
            for m in self.layers:
                self.networks.network_apply_weights(m)


def clean_foreign_networks(sd_model) -> ForeignNetworks:
    """Unmerge every LoRA the WebUI merged into the weights (restoring its pristine backups), and turn
    off hypernetworks, custom UNets and circular padding, so training sees the base model."""
    try:
        import networks  # the built-in Lora extension (already imported by the WebUI)
    except ImportError:
        networks = None
    merged_layers = []
    loaded = []
    if networks is not None:
        loaded = list(networks.loaded_networks)
        networks.loaded_networks.clear()
        with torch.no_grad():  # base weights may still require grad here (the WebUI's default)
            for m in list(sd_model.modules()):
                if getattr(m, "network_weights_backup", None) is not None or \
                        getattr(m, "network_bias_backup", None) is not None:
                    if getattr(m, "network_current_names", ()):
                        merged_layers.append(m)
                    networks.network_restore_weights_from_backup(m)
                    m.network_current_names = ()
    from modules import shared
    shared.loaded_hypernetworks = []
    try:
        from modules import sd_unet
        sd_unet.apply_unet("None")
    except Exception:
        pass
    try:
        from modules import sd_hijack
        sd_hijack.model_hijack.apply_circular(False)
    except Exception:
        pass
    return ForeignNetworks(networks, loaded, merged_layers)
