"""LyCORIS ``algo=full`` without touching the layer: a trainable ΔW (and Δb) added to the layer's
output. Saved as LyCORIS and the WebUI name it (``diff``, ``diff_b``), so the WebUI applies it as
``W + diff``. (lycoris-lora's own FullModule deletes the layer's weight while applied and recreates
it on the CPU afterwards, which a long-lived WebUI model cannot afford.)"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class FullDiffModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, *, dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if not isinstance(org, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{type(org).__name__} is not supported by algo=full")
        self.lora_name = name
        self.diff = nn.Parameter(torch.zeros_like(org.weight, dtype=torch.float32))
        self.diff_b = nn.Parameter(torch.zeros_like(org.bias, dtype=torch.float32)) if org.bias is not None else None
        self.multiplier = 1.0
        self.dropout = dropout
        self.module_dropout = module_dropout
        self.org_module = [org]          # a list: not a submodule, never saved
        self.org_forward = None
        self.not_supported = False

    def apply_to(self) -> None:
        org = self.org_module[0]
        if self.org_forward is None:
            self.org_forward = org.forward
            org.forward = self.forward

    def restore(self) -> None:
        org = self.org_module[0]
        if self.org_forward is not None:
            org.forward = self.org_forward
            self.org_forward = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        org = self.org_module[0]
        w = self.diff.to(x.dtype)
        b = self.diff_b.to(x.dtype) if self.diff_b is not None else None
        if isinstance(org, nn.Conv2d):
            return F.conv2d(x, w, b, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, w, b)

    def forward(self, x, *args, **kwargs):
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0 or (self.training and self.module_dropout and random.random() < self.module_dropout):
            return out
        d = self.delta(x)
        if self.training and self.dropout:
            d = F.dropout(d, p=self.dropout)
        return out + (d * self.multiplier).to(out.dtype)
