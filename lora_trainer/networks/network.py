"""The LoRA network over a host's UNet and text encoders: build, apply/remove, save/load, max-norm."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import UserError
from .base import NetworkBase
from .lora import LoRAModule, MHAPatch, make_mha_lora
from .naming import Target, text_encoder_targets, unet_targets

NETWORK_MODULE = "networks.lora"


class LoRANetwork(NetworkBase):
    """Holds one :class:`LoRAModule` per adapted layer, registered under its kohya name, so
    ``state_dict()`` has exactly the keys a kohya file has (``<name>.lora_down.weight`` ...)."""

    def __init__(self):
        super().__init__()
        self._patches: List[object] = []

    # ------------------------------------------------------------ construction
    @classmethod
    def create(cls, unet: Optional[nn.Module], text_encoders: Iterable[Tuple[str, nn.Module]], *,
               dim: int, alpha: float, conv_dim: Optional[int] = None, conv_alpha: Optional[float] = None,
               dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
               module_dropout: Optional[float] = None, unet_key_style: str = "diffusers") -> "LoRANetwork":
        net = cls()
        kw = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        targets: List[Target] = []
        if unet is not None:
            targets += unet_targets(unet, include_conv_blocks=conv_dim is not None, style=unet_key_style)
        for prefix, te in text_encoders:
            targets += text_encoder_targets(prefix, te)
        for t in targets:
            if t.name in net._modules:
                raise RuntimeError(f"two layers map to the LoRA name {t.name}")
            if t.kind == "mha":
                parts = make_mha_lora(t.name, t.module, dim, alpha, rank_dropout=rank_dropout,
                                      module_dropout=module_dropout)
                for n, m in parts.items():
                    net.add_module(n, m)
                    net.te_names.append(n)
                net._patches.append(MHAPatch(t.module, *parts.values()))
                continue
            if t.kind == "conv":
                if conv_dim is None:
                    continue
                m = LoRAModule(t.name, t.module, conv_dim, conv_alpha, **kw)
            else:
                m = LoRAModule(t.name, t.module, dim, alpha, **kw)
            net.add_module(t.name, m)
            (net.te_names if t.is_text_encoder else net.unet_names).append(t.name)
            net._patches.append(m)
        if not net._modules:
            raise UserError("No layer of the model matched the LoRA's targets: is this a Stable Diffusion model?")
        return net

    # ------------------------------------------------------------ access
    def lora_modules(self) -> List[LoRAModule]:
        return [m for m in self.children() if isinstance(m, LoRAModule)]  # creation order

    def unet_modules(self) -> List[LoRAModule]:
        return [self._modules[n] for n in self.unet_names]

    def te_modules(self) -> List[LoRAModule]:
        return [self._modules[n] for n in self.te_names]

    # ------------------------------------------------------------ apply / remove
    def apply(self) -> None:
        for p in self._patches:
            p.apply_to()
        self.applied = True

    def remove(self) -> None:
        for p in self._patches:
            p.remove()
        self.applied = False

    # ------------------------------------------------------------ weights
    def load_kohya_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        self._load_checked(sd, "this network", "network_dim, conv_dim")
        for m in self.lora_modules():
            m.scale = float(m.alpha) / m.lora_dim

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale each module whose ΔW norm exceeds ``max_norm`` back to it (up and down by √ratio).

        Returns ``(keys_scaled, mean_norm, max_norm)`` as device tensors: no host sync here."""
        norms = []
        scaled = []
        for m in self.lora_modules():
            up, down = m.lora_up.weight, m.lora_down.weight
            w = (up.flatten(1).float() @ down.flatten(1).float()) * m.scale
            norm = w.norm()
            desired = norm.clamp(max=max_norm)
            ratio = desired / norm.clamp(min=1e-12)
            sqrt_ratio = ratio.sqrt()
            up.mul_(sqrt_ratio.to(up.dtype))
            down.mul_(sqrt_ratio.to(down.dtype))
            scaled.append((ratio < 1).float())
            norms.append(desired)
        n = torch.stack(norms)
        return torch.stack(scaled).sum(), n.mean(), n.max()
