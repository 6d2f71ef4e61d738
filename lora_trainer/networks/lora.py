"""Plain LoRA (and LoCon for 3x3 convs), as sd-scripts' ``networks.lora``.

``output = org(x) + up(down(x)) * multiplier * alpha / dim``. Applying replaces the layer's
``forward`` on the instance only; base weights are never written, so removing the patch leaves the
model's forward bitwise as before. OpenCLIP's fused attention (``nn.MultiheadAttention``) gets four
LoRAs (q, k, v, out) whose deltas are added to its weights inside the patched forward.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, dim: int, alpha: Optional[float], *,
                 dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None, in_features: Optional[int] = None,
                 out_features: Optional[int] = None):
        super().__init__()
        self.lora_name = name
        if isinstance(org, nn.Conv2d):
            in_dim, out_dim = org.in_channels, org.out_channels
            self.lora_down = nn.Conv2d(in_dim, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, out_dim, 1, 1, bias=False)
            self.is_conv = True
        else:
            in_dim = in_features if in_features is not None else org.in_features
            out_dim = out_features if out_features is not None else org.out_features
            self.lora_down = nn.Linear(in_dim, dim, bias=False)
            self.lora_up = nn.Linear(dim, out_dim, bias=False)
            self.is_conv = False
        if alpha is None or alpha == 0:
            alpha = dim
        self.lora_dim = dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # the adapted layer and its forward, held outside the module tree (never saved, never trained)
        self.__dict__["org_module"] = org
        self.__dict__["org_forward"] = None
        self.__dict__["_saved_instance_forward"] = None

    # ------------------------------------------------------------ apply / remove
    def apply_to(self) -> None:
        org = self.org_module
        if self.org_forward is not None:
            return
        self.__dict__["_saved_instance_forward"] = org.__dict__.get("forward")
        self.__dict__["org_forward"] = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        org = self.org_module
        if self.org_forward is None:
            return
        if self._saved_instance_forward is not None:
            org.forward = self._saved_instance_forward
        else:
            org.__dict__.pop("forward", None)
        self.__dict__["org_forward"] = None
        self.__dict__["_saved_instance_forward"] = None

    # ------------------------------------------------------------ math
    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lora_down.weight
        if x.dtype != w.dtype:  # a half-precision host without autocast; under autocast ops recast anyway
            x = x.to(w.dtype)
        lx = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                shape = (lx.shape[0], self.lora_dim) + (1,) * (lx.dim() - 2) if self.is_conv else \
                    (lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.lora_dim,)
                mask = (torch.rand(shape, device=lx.device) > self.rank_dropout).to(lx.dtype)
                lx = lx * mask
                scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * (self.multiplier * scale)

    def forward(self, x, *args, **kwargs):
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0 or (self.training and self.module_dropout and random.random() < self.module_dropout):
            return out
        return out + self.lora_path(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = up @ down * scale * multiplier, in the adapted layer's weight shape."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if self.is_conv:
            w = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            w = up @ down
        return w * (self.scale * self.multiplier)


class MHAPatch:
    """LoRA on ``nn.MultiheadAttention`` (OpenCLIP): q/k/v deltas join ``in_proj_weight``, out's joins
    ``out_proj.weight``, inside the patched forward only."""

    def __init__(self, mha: nn.MultiheadAttention, q: LoRAModule, k: LoRAModule, v: LoRAModule, out: LoRAModule):
        self.mha, self.parts, self.out = mha, (q, k, v), out
        self._saved = None
        self._org_forward = None

    def apply_to(self) -> None:
        if self._org_forward is not None:
            return
        self._saved = self.mha.__dict__.get("forward")
        self._org_forward = self.mha.forward
        self.mha.forward = self.forward

    def remove(self) -> None:
        if self._org_forward is None:
            return
        if self._saved is not None:
            self.mha.forward = self._saved
        else:
            self.mha.__dict__.pop("forward", None)
        self._org_forward = None
        self._saved = None

    def _active(self, m: LoRAModule) -> bool:
        return not (m.training and m.module_dropout and random.random() < m.module_dropout) and m.multiplier != 0

    def forward(self, *args, **kwargs):
        mha = self.mha
        w_in = mha._parameters["in_proj_weight"]
        w_out = mha.out_proj._parameters["weight"]
        deltas = [m.delta_weight() if self._active(m) else torch.zeros_like(w_in[:1]).expand(m.lora_up.weight.shape[0], -1)
                  for m in self.parts]
        new_in = w_in + torch.cat(deltas, 0).to(w_in.dtype)
        new_out = w_out + self.out.delta_weight().to(w_out.dtype) if self._active(self.out) else w_out
        mha._parameters["in_proj_weight"] = new_in
        mha.out_proj._parameters["weight"] = new_out
        try:
            return self._org_forward(*args, **kwargs)
        finally:
            mha._parameters["in_proj_weight"] = w_in
            mha.out_proj._parameters["weight"] = w_out


def make_mha_lora(name: str, mha: nn.MultiheadAttention, dim: int, alpha, **kw) -> Dict[str, LoRAModule]:
    e = mha.embed_dim
    if mha.in_proj_weight is None:
        raise ValueError(f"{name}: separate q/k/v projection weights are not supported")
    return {f"{name}_{p}_proj": LoRAModule(f"{name}_{p}_proj", mha if p != "out" else mha.out_proj, dim, alpha,
                                           in_features=e, out_features=e, **kw)
            for p in ("q", "k", "v", "out")}
