"""Learning-rate schedules by sd-scripts' names, as ``LambdaLR`` multipliers of each group's lr.

``lr_warmup_steps`` below 1 is a fraction of all steps. Curves follow the definitions sd-scripts
uses (diffusers' ``get_scheduler``): linear decay to 0, half-cosine to 0, hard cosine restarts,
polynomial decay to 1e-7.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from ..errors import UserError

LambdaFactory = Callable[..., Callable[[int], float]]


def warmup_steps(value: float, total: int) -> int:
    return int(value * total) if 0 < value < 1 else int(value)


def _constant(warmup, total, **_):
    return lambda s: 1.0


def _constant_with_warmup(warmup, total, **_):
    return lambda s: min(1.0, s / warmup) if warmup and s < warmup else 1.0


def _linear(warmup, total, **_):
    def f(s):
        if s < warmup:
            return s / max(1, warmup)
        return max(0.0, (total - s) / max(1, total - warmup))
    return f


def _cosine(warmup, total, **_):
    def f(s):
        if s < warmup:
            return s / max(1, warmup)
        p = (s - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return f


def _cosine_with_restarts(warmup, total, num_cycles=1, **_):
    def f(s):
        if s < warmup:
            return s / max(1, warmup)
        p = (s - warmup) / max(1, total - warmup)
        if p >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
    return f


def _polynomial(warmup, total, power=1.0, lr_init=1.0, lr_end=1e-7, **_):
    def f(s):
        if s < warmup:
            return s / max(1, warmup)
        if s > total:
            return lr_end / lr_init
        remaining = 1 - (s - warmup) / max(1, total - warmup)
        return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init
    return f


SCHEDULES: Dict[str, LambdaFactory] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
}


def create_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup: int,
                    num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    factory = SCHEDULES.get(name)
    if factory is None:
        raise UserError(f"lr_scheduler {name!r} is unknown. Use one of: {', '.join(SCHEDULES)}.")
    lambdas = [factory(warmup, total_steps, num_cycles=num_cycles, power=power, lr_init=g["lr"] or 1.0)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
