"""The Host protocol: everything the core asks of the program that owns the model.

The WebUI adapter (``lora_trainer.webui``) implements it over ``shared.sd_model``; the standalone
LDM host (``lora_trainer.ldm_host``) over a checkpoint it loads itself; tests over tiny random
models. The core never imports a host's modules.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class Host(Protocol):
    model_kind: str                         # "sd1" | "sd2" | "sdxl"
    prediction_type: str                    # "epsilon" | "v"
    device: torch.device
    unet: nn.Module                         # LDM names: input_blocks.1.1.transformer_blocks.0.attn1.to_q
    text_encoders: List[Tuple[str, nn.Module]]  # [("lora_te", embedder)] or [("lora_te1", ..), ("lora_te2", ..)]
    alphas_cumprod: torch.Tensor            # the model's DDPM schedule, float32, on device
    weight_dtype: torch.dtype

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] -> scaled latents (B,4,H/8,W/8). No gradients."""

    def tokenize(self, captions: Sequence[str], max_token_length: int) -> Any:
        """Captions -> token ids (CPU), padded to a fixed number of 75-token chunks."""

    def encode_tokens(self, tokens: Any, clip_skip: int) -> Any:
        """Token ids -> conditioning; differentiable through the text encoders when they train."""

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The UNet's prediction (epsilon or v, per ``prediction_type``)."""

    def model_info(self) -> Dict[str, str]:
        """Name and hashes of the base model and VAE, for the saved file's metadata."""

    def vae_fingerprint(self) -> str:
        """A short id of the VAE's weights: latent caches made with another VAE are rebuilt."""

    def exclusive(self) -> contextlib.AbstractContextManager:
        """The host's generation lock, held for the whole run."""

    def prepare(self) -> None:
        """Make the model ready to train (unmerge foreign LoRAs, freeze base weights)."""

    def restore(self) -> None:
        """Put everything back exactly as ``prepare`` found it."""


class BaseHost:
    """Shared host behaviour: freezing and restoring the model's parameters and modes, checkpointing."""

    model_kind = "sd1"
    prediction_type = "epsilon"
    weight_dtype = torch.float32
    supports_sampling = False

    def __init__(self):
        self._saved_state: Optional[Dict[str, Any]] = None

    # -------------------------------------------------------------- modules the host owns
    def modules(self) -> List[nn.Module]:
        """Every module whose parameters prepare() freezes and restore() puts back."""
        return [self.unet] + [te for _, te in self.text_encoders] + self.extra_modules()

    def extra_modules(self) -> List[nn.Module]:
        return []

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield

    def prepare(self) -> None:
        if self._saved_state is not None:
            return
        params, modes, flags = [], [], []
        for root in self.modules():
            for p in root.parameters():
                params.append((p, p.requires_grad))
                p.requires_grad_(False)
            for m in root.modules():
                modes.append((m, m.training))
                # ldm's own checkpointing (use_checkpoint / checkpoint flags) differentiates only the
                # block's own parameters: LoRA weights inside would get no gradient. Ours replaces it.
                for attr in ("use_checkpoint", "checkpoint"):
                    if getattr(m, attr, None) is True:
                        flags.append((m, attr))
                        setattr(m, attr, False)
            root.eval()
        self._saved_state = {"params": params, "modes": modes, "flags": flags}

    def _offload(self, kind: str, modules) -> None:
        """Move modules off the GPU while only cached work is done (put back by ``reload_offloaded``)."""
        moved = self.__dict__.setdefault("_offloaded", {})
        modules = [m for m in modules if m is not None and next(m.parameters(), None) is not None]
        if self.device.type == "cpu" or kind in moved or not modules:
            return
        moved[kind] = [(m, next(m.parameters()).device) for m in modules]
        for m, _ in moved[kind]:
            m.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def offload_text_encoders(self) -> None:
        """The text encoders, once every caption's output is cached."""
        self._offload("text_encoders", [te for _, te in self.text_encoders])

    def offload_vae(self) -> None:
        """The VAE, once every image's latents are cached."""
        self._offload("vae", [getattr(self, "vae", None)])

    def offloaded(self) -> List[str]:
        return list(self.__dict__.get("_offloaded", {}))

    def reload_offloaded(self) -> List[str]:
        """Put every offloaded module back on its device; the kinds that were off."""
        moved = self.__dict__.pop("_offloaded", {})
        for items in moved.values():
            for m, dev in items:
                m.to(dev)
        return list(moved)

    def restore(self) -> None:
        self.reload_offloaded()
        state, self._saved_state = self._saved_state, None
        if state is None:
            return
        for p, rg in state["params"]:
            p.requires_grad_(rg)
        for m, training in state["modes"]:
            m.training = training
        for m, attr in state["flags"]:
            setattr(m, attr, True)

    # -------------------------------------------------------------- optional features
    def attention(self, sdpa: bool = True):
        """A context for the run's attention kernel (the WebUI host keeps the WebUI's)."""
        return contextlib.nullcontext(0)

    def checkpoint_blocks(self) -> List[nn.Module]:
        """Blocks that gradient checkpointing wraps (recomputed in backward)."""
        blocks: List[nn.Module] = []
        for name in ("input_blocks", "output_blocks"):
            blocks += list(getattr(self.unet, name, []))
        mid = getattr(self.unet, "middle_block", None)
        if mid is not None:
            blocks.append(mid)
        return blocks

    def sample(self, prompts, *, max_token_length: int = 75, clip_skip: int = 1, seed: int = 0, autocast=None):
        """Preview images (PIL) with whatever network is applied, by the core's DDIM sampler; needs the
        host's ``decode_latents``. Hosts with ``supports_sampling = True`` get it for free."""
        from .sampling import ddim_sample, to_pil
        return [to_pil(ddim_sample(self, sp, max_token_length=max_token_length, clip_skip=clip_skip,
                                   default_seed=seed + i, autocast=autocast)) for i, sp in enumerate(prompts)]

    def model_info(self) -> Dict[str, str]:
        return {}

    def vae_fingerprint(self) -> str:
        return "unknown"


def fingerprint_module(module: nn.Module, max_bytes_per_tensor: int = 1 << 16) -> str:
    """A short content id of a module's weights (a sample of each tensor's bytes, plus shapes)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() * flat.element_size() // max_bytes_per_tensor)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_state_hash(modules) -> str:
    """SHA-256 over every tensor's bytes and every parameter's requires_grad flag."""
    import hashlib
    h = hashlib.sha256()
    for root in modules:
        for name, t in root.state_dict(keep_vars=True).items():
            h.update(name.encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            h.update(b"1" if getattr(t, "requires_grad", False) else b"0")
    return h.hexdigest()
