"""Gradient checkpointing for any host: wraps blocks' forward in non-reentrant
``torch.utils.checkpoint`` (which, unlike ldm's own, also carries the LoRA weights' gradients)."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def gradient_checkpointing(blocks: List[nn.Module], enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = []
    for b in blocks:
        had = b.__dict__.get("forward")
        org = b.forward

        def wrapped(*args, __org=org, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(__org, *args, use_reentrant=False, **kwargs)
            return __org(*args, **kwargs)

        b.forward = functools.wraps(org)(wrapped)
        saved.append((b, had))
    try:
        yield
    finally:
        for b, had in saved:
            if had is not None:
                b.forward = had
            else:
                b.__dict__.pop("forward", None)
