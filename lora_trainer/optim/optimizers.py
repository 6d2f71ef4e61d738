"""Optimizers by sd-scripts' ``optimizer_type`` names. A registry, not an if/elif chain: each entry
names its package (imported only when chosen) and the guide's recommended arguments."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass
class OptimizerSpec:
    name: str
    target: str                    # "module:attr"
    package: str = ""              # pip package that provides it ("" = torch)
    adaptive: bool = False         # learns its own step size (one lr for all groups, ~1.0)
    defaults: Dict[str, Any] = field(default_factory=dict)   # the guide's recommended args
    fixed: Dict[str, Any] = field(default_factory=dict)      # args the name implies (e.g. nesterov)
    note: str = ""

    def load(self) -> Callable:
        mod, attr = self.target.split(":")
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise UserError(f"optimizer_type {self.name} needs the package '{self.package}', which is not installed "
                            f"({e}). Install it into this Python environment (pip install {self.package}) or pick "
                            "another optimizer, e.g. AdamW.") from None
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


OPTIMIZERS: Dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    OPTIMIZERS[spec.name.lower()] = spec
    return spec


register(OptimizerSpec("AdamW", "torch.optim:AdamW", defaults={"weight_decay": 0.01, "betas": (0.9, 0.999)}))
register(OptimizerSpec("SGDNesterov", "torch.optim:SGD", fixed={"nesterov": True}, defaults={"momentum": 0.9}))
register(OptimizerSpec("AdamW8bit", "bitsandbytes.optim:AdamW8bit", "bitsandbytes",
                       defaults={"weight_decay": 0.01, "betas": (0.9, 0.999)}))
register(OptimizerSpec("PagedAdamW8bit", "bitsandbytes.optim:PagedAdamW8bit", "bitsandbytes",
                       defaults={"weight_decay": 0.01, "betas": (0.9, 0.999)}))
register(OptimizerSpec("SGDNesterov8bit", "bitsandbytes.optim:SGD8bit", "bitsandbytes", fixed={"nesterov": True},
                       defaults={"momentum": 0.9}))
register(OptimizerSpec("Lion", "lion_pytorch:Lion", "lion-pytorch", defaults={"weight_decay": 0.01},
                       note="Lion wants a learning rate 10-15x lower than AdamW's."))
register(OptimizerSpec("Lion8bit", "bitsandbytes.optim:Lion8bit", "bitsandbytes", defaults={"weight_decay": 0.01},
                       note="Lion wants a learning rate 10-15x lower than AdamW's."))
register(OptimizerSpec("Prodigy", "prodigyopt:Prodigy", "prodigyopt", adaptive=True,
                       defaults={"decouple": True, "weight_decay": 0.01, "d_coef": 2.0,
                                 "use_bias_correction": True, "safeguard_warmup": True}))
for _name, _attr in (("DAdaptation", "DAdaptAdamPreprint"), ("DAdaptAdamPreprint", "DAdaptAdamPreprint"),
                     ("DAdaptAdaGrad", "DAdaptAdaGrad"), ("DAdaptAdam", "DAdaptAdam"), ("DAdaptAdan", "DAdaptAdan"),
                     ("DAdaptAdanIP", "experimental.DAdaptAdanIP"), ("DAdaptLion", "DAdaptLion"),
                     ("DAdaptSGD", "DAdaptSGD")):
    _mod = "dadaptation.experimental" if _attr.startswith("experimental.") else "dadaptation"
    register(OptimizerSpec(_name, f"{_mod}:{_attr.split('.')[-1]}", "dadaptation", adaptive=True,
                           defaults={"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.99)}
                           if _attr in ("DAdaptAdam", "DAdaptAdamPreprint") else {}))


def resolve(name: str) -> OptimizerSpec:
    spec = OPTIMIZERS.get(name.lower())
    if spec is not None:
        return spec
    if "." in name:  # any optimizer class by dotted path, e.g. came_pytorch.CAME
        mod, _, attr = name.rpartition(".")
        return OptimizerSpec(name, f"{mod}:{attr}", mod.split(".")[0])
    raise UserError(f"optimizer_type {name!r} is unknown. Use one of: "
                    + ", ".join(s.name for s in OPTIMIZERS.values()) + ", or a dotted class path.")


def create_optimizer(name: str, param_groups: List[dict], lr: float, args: Dict[str, Any]) -> torch.optim.Optimizer:
    spec = resolve(name)
    cls = spec.load()
    kwargs = {**spec.fixed, **args}
    if spec.adaptive and len({g["lr"] for g in param_groups}) > 1:
        log.warning("%s adapts its own step size and takes one learning rate; unet_lr and text_encoder_lr differ "
                    "(%s): using each as given, but 1.0 for all is the usual choice.", spec.name,
                    ", ".join(str(g["lr"]) for g in param_groups))
    groups = [dict(g) for g in param_groups]  # torch keeps extra keys such as "name" in each group
    try:
        return cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"optimizer_args {args} do not fit {spec.name}: {e}. Check the argument names.") from None
    except ValueError as e:
        raise UserError(f"{spec.name} refused its settings: {e}. Fix optimizer_args or the learning rate.") from None
