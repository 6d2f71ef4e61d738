"""From a config to an optimizer and its schedule, the way sd-scripts pairs them, with every
problem found before training starts (:func:`setting_problems`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch

from ..config import TrainConfig
from .optimizers import adafactor_relative_step, create_optimizer, lr_warnings, preflight, resolve
from .schedules import ADAFACTOR, create_schedule, schedule_problems
from ..errors import UserError

log = logging.getLogger(__name__)


def _scheduler_args(cfg: TrainConfig) -> Dict[str, Any]:
    return cfg.lr_scheduler_args_dict()


def effective_schedule(cfg: TrainConfig) -> Tuple[str, str]:
    """(lr_scheduler, lr_scheduler_type) as they will run: AdaFactor's relative step brings its own."""
    try:
        spec = resolve(cfg.optimizer_type)
    except UserError:
        return cfg.lr_scheduler, cfg.lr_scheduler_type
    if adafactor_relative_step(spec, cfg.optimizer_args_dict()):
        return f"{ADAFACTOR}:{cfg.learning_rate}", ""
    return cfg.lr_scheduler, cfg.lr_scheduler_type


def setting_problems(cfg: TrainConfig, device="cpu", total_steps: int = 1000) -> List[str]:
    """Everything wrong with the optimizer/schedule settings, each with the fix (empty = fine)."""
    try:
        args = cfg.optimizer_args_dict()
        sargs = _scheduler_args(cfg)
    except UserError as e:
        return [str(e)]
    problems = preflight(cfg.optimizer_type, args, device)
    if problems:
        return problems
    spec = resolve(cfg.optimizer_type)
    relative = adafactor_relative_step(spec, args)
    if relative and cfg.lr_scheduler_type:
        problems.append(f"optimizer_type AdaFactor with relative_step sets its own step size, so lr_scheduler_type "
                        f"{cfg.lr_scheduler_type} cannot apply: remove lr_scheduler_type, or add "
                        "relative_step=False (and scale_parameter=False, warmup_init=False) to optimizer_args.")
    # adafactor-scheduler and schedule-free pairings are string checks in TrainConfig.problems()
    if not relative:
        problems += schedule_problems(cfg.lr_scheduler, cfg.lr_scheduler_type, sargs, total_steps)
    return problems


def setting_warnings(cfg: TrainConfig) -> List[str]:
    """Legal but probably unintended settings (logged and shown; training still runs)."""
    out: List[str] = []
    try:
        spec = resolve(cfg.optimizer_type)
        args = cfg.optimizer_args_dict()
    except UserError:
        return out
    lrs = []
    if cfg.train_text_encoder():
        lrs.append(cfg.effective_text_encoder_lr())
    if cfg.train_unet():
        lrs.append(cfg.effective_unet_lr())
    out += lr_warnings(spec, lrs, args)
    if spec.kind == "adafactor":
        if adafactor_relative_step(spec, args):
            if cfg.lr_scheduler.split(":")[0] != ADAFACTOR:
                out.append(f"AdaFactor with relative_step: lr_scheduler {cfg.lr_scheduler} is replaced by AdaFactor's "
                           "own schedule (as in sd-scripts).")
        else:
            if cfg.max_grad_norm:
                out.append("AdaFactor clips its updates itself; max_grad_norm = 0 is the usual setting with it.")
            if cfg.lr_scheduler != "constant_with_warmup" and not cfg.lr_scheduler_type:
                out.append("AdaFactor with a fixed learning rate works best with lr_scheduler = constant_with_warmup.")
    if spec.note and spec.name.startswith("Lion") and cfg.learning_rate >= 1e-4:
        out.append(f"{spec.name}: {spec.note}")
    return out


def build(cfg: TrainConfig, param_groups: List[dict], *, total_steps: int, warmup: int):
    """The optimizer and schedule for a run (raises UserError with the fix for anything impossible)."""
    spec = resolve(cfg.optimizer_type)
    args = cfg.optimizer_args_dict()
    if spec.schedule_free and warmup and "warmup_steps" not in args:
        args["warmup_steps"] = warmup
    optimizer = create_optimizer(cfg.optimizer_type, param_groups, cfg.learning_rate, args, warn=False)
    name, stype = effective_schedule(cfg)
    if spec.schedule_free:
        name, stype, warmup = "constant", "", 0
    schedule = create_schedule(name, optimizer, total_steps=total_steps, warmup=warmup,
                               num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
                               scheduler_type=stype,
                               scheduler_args={} if name.startswith(ADAFACTOR) else _scheduler_args(cfg))
    return optimizer, schedule


def lr_curve(cfg: TrainConfig, total_steps: int, warmup: int) -> Dict[str, List[float]]:
    """The learning rate of each parameter group at every optimizer step, without a model.

    Adaptive optimizers show the multiplier of their own step size; AdaFactor with relative_step
    shows its starting value (its real step size depends on the weights)."""
    groups = []
    if cfg.train_text_encoder():
        groups.append(("textencoder", cfg.effective_text_encoder_lr()))
    if cfg.train_unet():
        groups.append(("unet", cfg.effective_unet_lr()))
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "name": n} for n, lr in groups]
    spec = resolve(cfg.optimizer_type)
    name, stype = effective_schedule(cfg)
    if name.startswith(ADAFACTOR):
        return {n: [float(cfg.learning_rate)] * total_steps for n, _ in groups}
    if spec.schedule_free:
        name, stype = "constant", ""
    opt = torch.optim.SGD(params, lr=cfg.learning_rate)
    sched = create_schedule(name, opt, total_steps=total_steps, warmup=warmup,
                            num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
                            scheduler_type=stype, scheduler_args=_scheduler_args(cfg))
    curves: Dict[str, List[float]] = {n: [] for n, _ in groups}
    for _ in range(total_steps):
        for (n, _), g in zip(groups, opt.param_groups):
            curves[n].append(float(g["lr"]))
        opt.step()
        sched.step()
    if spec.schedule_free and warmup:  # the optimizer's own warm-up
        for n in curves:
            curves[n] = [v * min(1.0, (i + 1) / warmup) for i, v in enumerate(curves[n])]
    return curves
