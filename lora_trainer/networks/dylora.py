"""DyLoRA as sd-scripts' ``networks.dylora`` trains it (``network_args = ["unit=4", "conv_dim=..."]``),
also used for LyCORIS ``algo=dylora`` (``block_size`` = unit).

The rank is split into blocks of ``unit``. Each training forward picks a block b at random; the
blocks before it are used frozen, block b trains, the later ones are used frozen too, and the
update is scaled by sqrt(dim / ((b + 1) * unit)), as sd-scripts does. Frozen blocks get no gradient
at all (they are detached, so optimizers skip them as they skip sd-scripts' requires_grad=False
ranks). The rank is drawn from torch's RNG so gradient checkpointing's recomputation draws the same.
In eval mode the full rank is used at scale alpha/dim: exactly what the saved file (plain
``lora_up``/``lora_down``/``alpha``, loadable by the WebUI and resizable to any multiple of unit) does.

(lycoris-lora 4.x's own DyLoRA cannot reload a file, draws ranks in eval mode too, and trains at a
scale its saved alpha does not reproduce: research libs.md §3.5.)
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .naming import text_encoder_targets, unet_targets

NETWORK_MODULE = "networks.dylora"
KNOWN_ARGS = {"unit", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"}


class DyLoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, dim: int, alpha: Optional[float], *, unit: int = 1,
                 dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if dim % unit:
            raise UserError(f"DyLoRA: the rank {dim} must be a multiple of unit {unit}: set network_dim (and "
                            "conv_dim) to a multiple of unit.")
        self.lora_name = name
        self.lora_dim, self.unit = dim, unit
        if isinstance(org, nn.Conv2d):
            self.is_conv = True
            self.kernel = tuple(org.kernel_size)
            self.stride, self.padding = org.stride, org.padding
            in_dim, out_dim = org.in_channels, org.out_channels
        elif isinstance(org, nn.Linear):
            self.is_conv = False
            self.kernel = ()
            in_dim, out_dim = org.in_features, org.out_features
        else:
            raise ValueError(f"{type(org).__name__} is not supported by DyLoRA")
        n = dim // unit
        self.down_blocks = nn.ParameterList([nn.Parameter(torch.empty(unit, in_dim, *self.kernel)) for _ in range(n)])
        self.up_blocks = nn.ParameterList([nn.Parameter(torch.zeros(out_dim, unit)) for _ in range(n)])
        for p in self.down_blocks:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        alpha = dim if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        self.multiplier = 1.0
        self.dropout, self.module_dropout = dropout, module_dropout
        self.org_module = [org]
        self.org_forward = None
        self.not_supported = False

    # ------------------------------------------------------------ apply / restore
    def apply_to(self) -> None:
        if self.org_forward is None:
            self.org_forward = self.org_module[0].forward
            self.org_module[0].forward = self.forward

    def restore(self) -> None:
        if self.org_forward is not None:
            self.org_module[0].forward = self.org_forward
            self.org_forward = None

    # ------------------------------------------------------------ weights
    def down_weight(self, train_block: Optional[int] = None) -> torch.Tensor:
        return torch.cat([p if i == train_block or train_block is None else p.detach()
                          for i, p in enumerate(self.down_blocks)])

    def up_weight(self, train_block: Optional[int] = None) -> torch.Tensor:
        return torch.cat([p if i == train_block or train_block is None else p.detach()
                          for i, p in enumerate(self.up_blocks)], dim=1)

    def delta_weight(self) -> torch.Tensor:
        w = self.up_weight() @ self.down_weight().flatten(1)
        return (w * self.scale * self.multiplier).reshape(w.shape[0], *self.down_blocks[0].shape[1:])

    def forward(self, x, *args, **kwargs):
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0 or (self.training and self.module_dropout and random.random() < self.module_dropout):
            return out
        if self.training:
            b = int(torch.randint(0, len(self.down_blocks), (1,)).item())
            factor = math.sqrt(self.lora_dim / ((b + 1) * self.unit))
        else:
            b, factor = None, 1.0
        down = self.down_weight(b).to(x.dtype)
        up = self.up_weight(b).to(x.dtype)
        if self.is_conv:
            h = F.conv2d(x, down, stride=self.stride, padding=self.padding)
            if self.training and self.dropout:
                h = F.dropout(h, p=self.dropout)
            h = F.conv2d(h, up.reshape(*up.shape, 1, 1))
        else:
            h = F.linear(x, down)
            if self.training and self.dropout:
                h = F.dropout(h, p=self.dropout)
            h = F.linear(h, up)
        return out + (h * (self.scale * factor * self.multiplier)).to(out.dtype)

    # the file holds plain LoRA tensors
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if destination is None:
            destination = OrderedDict()
        up = self.up_weight()
        destination[prefix + "lora_up.weight"] = (up.reshape(*up.shape, 1, 1) if self.is_conv else up).detach()
        destination[prefix + "lora_down.weight"] = self.down_weight().detach()
        destination[prefix + "alpha"] = self.alpha
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = {k: prefix + k for k in ("lora_up.weight", "lora_down.weight", "alpha")}
        if not all(v in state_dict for v in keys.values()):
            missing_keys.extend(v for v in keys.values() if v not in state_dict)
            return
        with torch.no_grad():
            up = state_dict[keys["lora_up.weight"]].reshape(self.up_blocks[0].shape[0], self.lora_dim)
            down = state_dict[keys["lora_down.weight"]].reshape(self.lora_dim, *self.down_blocks[0].shape[1:])
            for i, (pu, pd) in enumerate(zip(self.up_blocks, self.down_blocks)):
                pu.copy_(up[:, i * self.unit:(i + 1) * self.unit])
                pd.copy_(down[i * self.unit:(i + 1) * self.unit])
            self.alpha.copy_(state_dict[keys["alpha"]])
        self.scale = float(self.alpha) / self.lora_dim

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device=None):
        norm = (self.up_weight() @ self.down_weight().flatten(1)).norm() * self.scale
        desired = norm.clamp(max=max_norm)
        ratio = desired / norm.clamp(min=1e-12)
        if ratio < 1:
            s = ratio.sqrt()
            for p in list(self.up_blocks) + list(self.down_blocks):
                p.mul_(s)
        return ratio < 1, desired


def settings(network_args: Dict[str, Any], dim: int, alpha: float) -> Dict[str, Any]:
    unknown = sorted(set(network_args) - KNOWN_ARGS)
    if unknown:
        raise UserError(f"network_args {unknown} are not understood by networks.dylora; it takes {sorted(KNOWN_ARGS)}.")
    unit = int(network_args.get("unit", 1))
    if unit < 1:
        raise UserError(f"network_args unit={unit}: must be at least 1 (sd-scripts' default is 1; 4 or 8 is common).")
    conv_dim = network_args.get("conv_dim")
    s = {"dim": int(dim), "alpha": float(alpha or dim), "unit": unit,
         "conv_dim": int(conv_dim) if conv_dim else None,
         "conv_alpha": float(network_args.get("conv_alpha") or 1.0)}
    for k in ("dropout", "module_dropout"):
        s[k] = float(network_args.get(k) or 0.0)
    for d in (s["dim"], s["conv_dim"]):
        if d and d % unit:
            raise UserError(f"networks.dylora: rank {d} is not a multiple of unit {unit}: use network_dim/conv_dim "
                            f"that unit divides (e.g. {max(unit, d - d % unit)}).")
    return s


def create(unet, text_encoders, *, dim: int, alpha: float, network_args: Dict[str, Any],
           dropout: Optional[float] = None, unet_key_style: str = "diffusers", unit_key: str = "unit"):
    """An :class:`AdapterNetwork` of DyLoRA modules over plain LoRA's targets (LoCon convs with conv_dim)."""
    from .lycoris_adapter import AdapterNetwork, OPENCLIP_MSG
    na = dict(network_args)
    if unit_key != "unit" and unit_key in na:
        na["unit"] = na.pop(unit_key)
    s = settings(na, dim, alpha)
    if dropout and not s["dropout"]:
        s["dropout"] = float(dropout)
    net = AdapterNetwork({"algo": "dylora", **s})
    targets = []
    if unet is not None:
        targets += unet_targets(unet, include_conv_blocks=s["conv_dim"] is not None, style=unet_key_style)
    for prefix, te in text_encoders:
        if any(isinstance(m, nn.MultiheadAttention) for m in te.modules()):
            raise UserError(OPENCLIP_MSG.replace("lycoris.kohya", "DyLoRA"))
        targets += text_encoder_targets(prefix, te)
    for t in targets:
        if t.kind == "conv" and s["conv_dim"] is None:
            continue
        d, a = (s["conv_dim"], s["conv_alpha"]) if t.kind == "conv" else (s["dim"], s["alpha"])
        net.add(t.name, DyLoRAModule(t.name, t.module, d, a, unit=s["unit"], dropout=s["dropout"],
                                     module_dropout=s["module_dropout"]), t.is_text_encoder)
    if not net.unet_names and not net.te_names:
        raise UserError("No layer of the model matched DyLoRA's targets: is this a Stable Diffusion model?")
    return net


def create_from_config(cfg, host):
    return create(host.unet if cfg.train_unet() else None,
                  list(host.text_encoders) if cfg.train_text_encoder() else [],
                  dim=cfg.network_dim, alpha=cfg.network_alpha, network_args=cfg.network_args_dict(),
                  dropout=cfg.network_dropout, unet_key_style="ldm" if host.model_kind == "sdxl" else "diffusers")
