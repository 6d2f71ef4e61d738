"""Learning-rate schedules by sd-scripts' names, as ``LambdaLR`` multipliers of each group's lr.

``lr_warmup_steps`` below 1 is a fraction of all steps. Curves follow the definitions sd-scripts
uses (diffusers'/transformers' ``get_scheduler``): linear decay to 0, half-cosine to 0, hard cosine
restarts, polynomial decay to 1e-7, ... The value a schedule gives at step ``s`` is the lr used by
the ``s``-th optimizer step (0-based).

Beyond the names: ``adafactor`` (AdaFactor's own relative step, reported), any scheduler class by
dotted path (``lr_scheduler_type`` + ``lr_scheduler_args``, as sd-scripts), and a built-in
``CosineAnnealingWarmupRestarts`` with the guide's parameters, so nobody patches site-packages.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import UserError

LambdaFactory = Callable[..., Callable[[int], float]]


def warmup_steps(value: float, total: int) -> int:
    return int(value * total) if 0 < value < 1 else int(value)


def _ramp(s: int, warmup: int) -> float:
    return s / max(1, warmup)


def _constant(warmup, total, **_):
    return lambda s: 1.0


def _constant_with_warmup(warmup, total, **_):
    return lambda s: min(1.0, s / warmup) if warmup and s < warmup else 1.0


def _linear(warmup, total, **_):
    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        return max(0.0, (total - s) / max(1, total - warmup))
    return f


def _cosine(warmup, total, **_):
    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        p = (s - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return f


def _cosine_with_restarts(warmup, total, num_cycles=1, **_):
    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        p = (s - warmup) / max(1, total - warmup)
        if p >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
    return f


def _polynomial(warmup, total, power=1.0, lr_init=1.0, lr_end=1e-7, **_):
    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        if s > total:
            return lr_end / lr_init
        remaining = 1 - (s - warmup) / max(1, total - warmup)
        return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init
    return f


def _cosine_with_min_lr(warmup, total, num_cycles=1, min_lr_rate=0.0, **_):
    """transformers' cosine_with_min_lr as sd-scripts calls it (num_cycles/2 half-waves, floor min_lr_rate)."""
    cycles = num_cycles / 2

    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        p = (s - warmup) / max(1, total - warmup)
        v = 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * p))
        return v * (1 - min_lr_rate) + min_lr_rate
    return f


def _inverse_sqrt(warmup, total, timescale=None, **_):
    ts = timescale or (warmup or 10_000)

    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        shift = ts - warmup
        return 1.0 / math.sqrt((s + shift) / ts)
    return f


def _warmup_stable_decay(warmup, total, num_decay_steps=None, num_stable_steps=None, min_lr_ratio=0.0,
                         decay_type="linear", **_):
    """transformers' warmup_stable_decay: ramp, hold, then decay to ``min_lr_ratio`` (linear or cosine)."""
    decay = int(num_decay_steps) if num_decay_steps is not None else max(0, int(0.1 * total))
    stable = int(num_stable_steps) if num_stable_steps is not None else max(0, total - warmup - decay)

    def f(s):
        if s < warmup:
            return _ramp(s, warmup)
        if s < warmup + stable:
            return 1.0
        if s < warmup + stable + decay:
            p = (s - warmup - stable) / max(1, decay)
            v = 0.5 * (1.0 + math.cos(math.pi * p)) if decay_type == "cosine" else 1.0 - p
            return (1.0 - min_lr_ratio) * v + min_lr_ratio
        return min_lr_ratio
    return f


def _piecewise_constant(warmup, total, step_rules="", **_):
    """diffusers' piecewise_constant: ``step_rules="1:10,0.1:20,0.01"`` = 1 until step 10, 0.1 until 20, then 0.01."""
    rules = []
    last = 1.0
    for part in str(step_rules).split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            v, until = part.split(":")
            rules.append((int(until), float(v)))
        else:
            last = float(part)

    def f(s):
        for until, v in rules:
            if s < until:
                return v
        return last
    return f


def cosine_annealing_warmup_restarts(warmup, total, *, T_0: Optional[int] = None, num_cycles: int = 1,
                                     gamma_min_lr: float = 1.0, decay: float = 1.0, down_factor: float = 0.0,
                                     warmup_steps: Optional[int] = None, cycle_warmup: int = 0,
                                     init_lr_ground: bool = False, **_) -> Callable[[int], float]:
    """Cosine annealing with warm restarts, the guide's parameters (a clean rewrite, closed form).

    - ``warmup_steps`` (default: lr_warmup_steps): a linear ramp of the whole curve at the start, from 0
      (``init_lr_ground=True``) or from 1/warmup_steps.
    - Cycles of ``T_0`` steps (default: all steps / lr_scheduler_num_cycles) start after that warm-up.
      Cycle k runs from its peak ``decay**k`` down a half cosine to ``down_factor`` x the peak.
    - From the second cycle on, the first ``cycle_warmup`` steps climb linearly from that floor back to
      the peak instead of jumping there (the guide's fix for cosine_with_restarts' 0 -> lr jump).
    - ``gamma_min_lr``: after the warm-up every step multiplies the whole curve by this (0.999 ~ slow decay).
    """
    W = warmup if warmup_steps is None else int(warmup_steps)
    T = int(T_0) if T_0 else max(1, math.ceil(max(1, total - W) / max(1, num_cycles)))
    C = int(cycle_warmup)
    df, g, d = float(down_factor), float(gamma_min_lr), float(decay)

    def f(s):
        ramp = 1.0 if W <= 0 or s >= W else (s if init_lr_ground else s + 1) / W
        t = max(0, s - W)
        k, u = divmod(t, T)
        peak = d ** k * g ** t
        floor = peak * df
        if k > 0 and u < C:
            value = floor + (peak - floor) * u / C
        else:
            start = C if k > 0 else 0
            phase = (u - start) / max(1, T - start)
            value = floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * phase))
        return ramp * value
    return f


CAWR_ARGS = {"T_0": int, "gamma_min_lr": float, "decay": float, "down_factor": float, "warmup_steps": int,
             "cycle_warmup": int, "init_lr_ground": bool}


def _check_cawr(args: Dict[str, Any], total: int) -> List[str]:
    p = []
    for k, v in args.items():
        if k not in CAWR_ARGS:
            p.append(f"lr_scheduler_args {k}: CosineAnnealingWarmupRestarts takes {', '.join(CAWR_ARGS)}.")
            continue
        want = CAWR_ARGS[k]
        ok = isinstance(v, bool) if want is bool else (isinstance(v, (int, float)) and not isinstance(v, bool))
        if want is int and ok and float(v) != int(v):
            ok = False
        if not ok:
            p.append(f"lr_scheduler_args {k}={v}: CosineAnnealingWarmupRestarts wants "
                     f"{'True or False' if want is bool else 'a whole number' if want is int else 'a number'}.")
    if p:
        return p
    if "T_0" in args and args["T_0"] < 1:
        p.append(f"lr_scheduler_args T_0={args['T_0']}: the cycle length in steps must be >= 1 "
                 f"(all steps / restarts, e.g. {max(1, total // 4)} for 4 cycles).")
    if not 0 < args.get("gamma_min_lr", 1.0) <= 1:
        p.append(f"lr_scheduler_args gamma_min_lr={args['gamma_min_lr']}: use a value in (0, 1], e.g. 0.999.")
    if not 0 <= args.get("down_factor", 0.0) <= 1:
        p.append(f"lr_scheduler_args down_factor={args['down_factor']}: the floor as a fraction of the peak, in [0, 1].")
    if args.get("decay", 1.0) <= 0:
        p.append(f"lr_scheduler_args decay={args['decay']}: must be > 0 (1 keeps every cycle's peak).")
    if args.get("warmup_steps", 0) < 0 or args.get("cycle_warmup", 0) < 0:
        p.append("lr_scheduler_args warmup_steps/cycle_warmup must be >= 0.")
    if "T_0" in args and args.get("cycle_warmup", 0) >= args["T_0"]:
        p.append(f"lr_scheduler_args cycle_warmup={args['cycle_warmup']} must be shorter than T_0={args['T_0']}.")
    return p


# name -> (factory, extra arguments it takes through lr_scheduler_args)
SCHEDULES: Dict[str, LambdaFactory] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "inverse_sqrt": _inverse_sqrt,
    "warmup_stable_decay": _warmup_stable_decay,
    "piecewise_constant": _piecewise_constant,
}
SCHEDULE_ARGS: Dict[str, Dict[str, type]] = {
    "polynomial": {"lr_end": float},
    "cosine_with_min_lr": {"min_lr_rate": float},
    "inverse_sqrt": {"timescale": int},
    "warmup_stable_decay": {"num_decay_steps": int, "num_stable_steps": int, "min_lr_ratio": float,
                            "decay_type": str},
    "piecewise_constant": {"step_rules": str},
}
ADAFACTOR = "adafactor"
BUILTIN_TYPES = {"cosineannealingwarmuprestarts": "CosineAnnealingWarmupRestarts",
                 "cosine_annealing_warmup.cosineannealingwarmuprestarts": "CosineAnnealingWarmupRestarts"}
ALL_NAMES = list(SCHEDULES) + [ADAFACTOR]


def _builtin_type(scheduler_type: str) -> Optional[str]:
    return BUILTIN_TYPES.get((scheduler_type or "").strip().lower())


def _load_class(path: str):
    mod, _, attr = path.strip().rpartition(".")
    if not mod:
        raise UserError(f"lr_scheduler_type {path!r}: give a dotted class path (e.g. "
                        "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts) or CosineAnnealingWarmupRestarts.")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise UserError(f"lr_scheduler_type {path!r}: cannot import '{mod}' ({e}). Install its package into the "
                        "Python that runs the trainer, or use a built-in lr_scheduler.") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserError(f"lr_scheduler_type {path!r}: '{mod}' has no '{attr}'. Check the spelling (case matters).")
    return cls


def schedule_problems(name: str, scheduler_type: str, args: Dict[str, Any], total: int = 1000) -> List[str]:
    """Unknown names, unknown or mistyped arguments: found before training starts."""
    if scheduler_type:
        if _builtin_type(scheduler_type):
            return _check_cawr(args, total)
        try:
            cls = _load_class(scheduler_type)
        except UserError as e:
            return [str(e)]
        try:
            sig = inspect.signature(cls.__init__)
        except (TypeError, ValueError):
            return []
        params = {n for n in sig.parameters if n not in ("self", "optimizer")}
        if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return []
        bad = [k for k in args if k not in params]
        if bad:
            return [f"lr_scheduler_args {bad[0]}: {scheduler_type} takes {', '.join(sorted(params))}."]
        return []
    base = name.split(":")[0]
    if base == ADAFACTOR:
        return []
    if base not in SCHEDULES:
        return [f"lr_scheduler {name!r} is unknown. Use one of: {', '.join(ALL_NAMES)}; or set lr_scheduler_type "
                "to a scheduler class path, or to CosineAnnealingWarmupRestarts."]
    takes = SCHEDULE_ARGS.get(base, {})
    for k, v in args.items():
        if k not in takes:
            return [f"lr_scheduler_args {k}: lr_scheduler {base} takes "
                    + (", ".join(takes) if takes else "no extra arguments") + "."]
        if takes[k] in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return [f"lr_scheduler_args {k}={v}: a number is needed."]
    return []


def create_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup: int,
                    num_cycles: int = 1, power: float = 1.0, scheduler_type: str = "",
                    scheduler_args: Optional[Dict[str, Any]] = None):
    """The scheduler for ``optimizer``: ``scheduler_type`` (a class path or the built-in restarts
    schedule) wins over ``name`` as in sd-scripts; ``adafactor`` needs an AdaFactor optimizer."""
    args = dict(scheduler_args or {})
    problems = schedule_problems(name, scheduler_type, args, total_steps)
    if problems:
        raise UserError(" ".join(problems))
    if scheduler_type and _builtin_type(scheduler_type):
        lambdas = [cosine_annealing_warmup_restarts(warmup, total_steps, num_cycles=num_cycles, **args)
                   for _ in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    if scheduler_type:
        cls = _load_class(scheduler_type)
        try:
            return cls(optimizer, **args)
        except (TypeError, ValueError) as e:
            raise UserError(f"lr_scheduler_type {scheduler_type} refused lr_scheduler_args {args}: {e}.") from None
    base, _, initial = name.partition(":")
    if base == ADAFACTOR:
        if type(optimizer).__name__ != "Adafactor":
            raise UserError(f"lr_scheduler adafactor works only with optimizer_type AdaFactor (not "
                            f"{type(optimizer).__name__}): pick another lr_scheduler, e.g. cosine or constant.")
        from transformers.optimization import AdafactorSchedule
        return AdafactorSchedule(optimizer, float(initial) if initial else 0.0)
    factory = SCHEDULES[base]
    lambdas = [factory(warmup, total_steps, num_cycles=num_cycles, power=power, lr_init=g["lr"] or 1.0, **args)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
