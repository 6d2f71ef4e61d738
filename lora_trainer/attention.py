"""Attention for the standalone hosts: LDM's ``CrossAttention`` computes attention with einsum +
softmax, materialising every (tokens x tokens) score matrix per head and keeping it for backward (at
512² on SD1.5, 4096 x 4096 per head per layer). ``sdpa_attention`` gives each such module a forward
through ``torch.nn.functional.scaled_dot_product_attention`` for the run (the same maths, fused
kernels, no stored score matrix) and puts the original back afterwards. The q/k/v/out layers are still
called as modules, so LoRA patches on them apply unchanged."""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

LDM_ATTENTION_CLASSES = {"CrossAttention", "MemoryEfficientCrossAttention"}


def sdpa_forward(self, x: torch.Tensor, context=None, mask=None, **_) -> torch.Tensor:
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, t.shape[1], h, t.shape[2] // h).transpose(1, 2) for t in (q, k, v))
    attn_mask = None
    if mask is not None:
        attn_mask = mask.reshape(b, -1).bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
    return self.to_out(out)


@contextlib.contextmanager
def sdpa_attention(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Yields how many attention modules use SDPA for the block."""
    patched = []
    if enabled:
        for m in root.modules():
            if type(m).__name__ in LDM_ATTENTION_CLASSES and hasattr(m, "to_q") and hasattr(m, "heads"):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = types.MethodType(sdpa_forward, m)
    try:
        yield len(patched)
    finally:
        for m, had in patched:
            if had is not None:
                m.forward = had
            else:
                m.__dict__.pop("forward", None)
