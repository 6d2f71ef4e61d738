"""Optimizers by sd-scripts' ``optimizer_type`` names. A registry, not an if/elif chain: each entry
names its package (imported only when chosen), what the name implies, and the guide's recommended
arguments (offered to the user as defaults, never applied behind their back).

Semantics follow sd-scripts where they differ from the library's: ``SGDNesterov`` gets momentum 0.9
unless told otherwise; ``AdaFactor`` uses relative steps unless ``relative_step=False`` and then runs
its own schedule; schedule-free optimizers take the warm-up themselves and need ``train()``/``eval()``
switching (see :func:`eval_mode`). Any other optimizer class is reachable by its dotted path.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass
class OptimizerSpec:
    name: str
    target: str                    # "module:attr"
    package: str = ""              # pip package that provides it ("" = torch)
    adaptive: bool = False         # learns its own step size (one lr for all groups, ~1.0)
    recommended: Dict[str, Any] = field(default_factory=dict)  # the guide's args, offered as defaults
    implied: Dict[str, Any] = field(default_factory=dict)      # set when absent (sd-scripts does the same)
    fixed: Dict[str, Any] = field(default_factory=dict)        # what the name means (nesterov=True)
    note: str = ""
    kind: str = ""                 # "" | "bnb8bit" | "adafactor" | "schedulefree"
    install: str = ""              # how to install, when more than "pip install <package>"

    @property
    def schedule_free(self) -> bool:
        return self.kind == "schedulefree"

    def load(self) -> Callable:
        mod, attr = self.target.split(":")
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise UserError(missing_package_message(self, e)) from None
        except Exception as e:  # a broken install (e.g. bitsandbytes without its binary) raises anything
            raise UserError(f"optimizer_type {self.name}: the package '{self.package or mod}' is installed but "
                            f"fails to import ({type(e).__name__}: {e}). Reinstall it or pick another optimizer, "
                            "e.g. AdamW.") from None
        obj = module
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"optimizer_type {self.name}: '{mod}' has no '{attr}'. Check the name (it is "
                            "case-sensitive) or the installed version of the package.") from None
        return obj


def missing_package_message(spec: OptimizerSpec, err: Exception) -> str:
    how = spec.install or f"pip install {spec.package}"
    return (f"optimizer_type {spec.name} needs the package '{spec.package}', which is not installed ({err}). "
            f"Install it into the Python that runs the trainer ({how}) or pick another optimizer, e.g. AdamW.")


OPTIMIZERS: Dict[str, OptimizerSpec] = {}
ALIASES: Dict[str, str] = {}


def register(spec: OptimizerSpec, *aliases: str) -> OptimizerSpec:
    OPTIMIZERS[spec.name.lower()] = spec
    for a in aliases:
        ALIASES[a.lower()] = spec.name.lower()
    return spec


_BNB_INSTALL = ("pip install bitsandbytes; its 8-bit optimizers run on NVIDIA GPUs, and on the CPU only from "
                "bitsandbytes 0.50 (torch >= 2.4). With torch 2.1 the newest that installs is 0.45.5")
_ADAMW_ARGS = {"weight_decay": 0.01, "betas": (0.9, 0.999)}
_LION_NOTE = "Lion wants a learning rate 10-15x lower than AdamW's (and 3-10x more weight decay)."

register(OptimizerSpec("AdamW", "torch.optim:AdamW", recommended=_ADAMW_ARGS))
register(OptimizerSpec("SGDNesterov", "torch.optim:SGD", fixed={"nesterov": True}, implied={"momentum": 0.9}))
register(OptimizerSpec("AdamW8bit", "bitsandbytes.optim:AdamW8bit", "bitsandbytes", recommended=_ADAMW_ARGS,
                       kind="bnb8bit", install=_BNB_INSTALL))
register(OptimizerSpec("PagedAdamW8bit", "bitsandbytes.optim:PagedAdamW8bit", "bitsandbytes",
                       recommended=_ADAMW_ARGS, kind="bnb8bit", install=_BNB_INSTALL))
register(OptimizerSpec("SGDNesterov8bit", "bitsandbytes.optim:SGD8bit", "bitsandbytes", fixed={"nesterov": True},
                       implied={"momentum": 0.9}, kind="bnb8bit", install=_BNB_INSTALL))
register(OptimizerSpec("Lion", "lion_pytorch:Lion", "lion-pytorch", recommended={"weight_decay": 0.01},
                       note=_LION_NOTE))
register(OptimizerSpec("Lion8bit", "bitsandbytes.optim:Lion8bit", "bitsandbytes", recommended={"weight_decay": 0.01},
                       note=_LION_NOTE, kind="bnb8bit", install=_BNB_INSTALL))
register(OptimizerSpec("PagedLion8bit", "bitsandbytes.optim:PagedLion8bit", "bitsandbytes",
                       recommended={"weight_decay": 0.01}, note=_LION_NOTE, kind="bnb8bit", install=_BNB_INSTALL))
register(OptimizerSpec("Prodigy", "prodigyopt:Prodigy", "prodigyopt", adaptive=True,
                       recommended={"decouple": True, "weight_decay": 0.01, "d_coef": 2.0,
                                    "use_bias_correction": True, "safeguard_warmup": True}))
_DADAPT_ADAM_ARGS = {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.99)}
register(OptimizerSpec("DAdaptAdamPreprint", "dadaptation.experimental:DAdaptAdamPreprint", "dadaptation",
                       adaptive=True, recommended=_DADAPT_ADAM_ARGS), "DAdaptation")
register(OptimizerSpec("DAdaptAdam", "dadaptation:DAdaptAdam", "dadaptation", adaptive=True,
                       recommended=_DADAPT_ADAM_ARGS))
register(OptimizerSpec("DAdaptAdaGrad", "dadaptation:DAdaptAdaGrad", "dadaptation", adaptive=True))
register(OptimizerSpec("DAdaptAdan", "dadaptation:DAdaptAdan", "dadaptation", adaptive=True))
register(OptimizerSpec("DAdaptAdanIP", "dadaptation.experimental:DAdaptAdanIP", "dadaptation", adaptive=True))
register(OptimizerSpec("DAdaptLion", "dadaptation:DAdaptLion", "dadaptation", adaptive=True))
register(OptimizerSpec("DAdaptSGD", "dadaptation:DAdaptSGD", "dadaptation", adaptive=True))
register(OptimizerSpec("AdaFactor", "transformers.optimization:Adafactor", "transformers", kind="adafactor",
                       recommended={"scale_parameter": False, "relative_step": False, "warmup_init": False},
                       note="With relative_step (the default) AdaFactor sets its own step size and schedule; "
                            "with relative_step=False use lr_scheduler = constant_with_warmup."))
for _sf in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"):
    register(OptimizerSpec(_sf, f"schedulefree:{_sf}", "schedulefree", kind="schedulefree",
                           note="Schedule-free: use lr_scheduler = constant; warm-up is the optimizer's own "
                                "warmup_steps."))


def resolve(name: str) -> OptimizerSpec:
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key)
    spec = OPTIMIZERS.get(key)
    if spec is not None:
        return spec
    if "." in name:  # any optimizer class by dotted path, e.g. came_pytorch.CAME
        mod, _, attr = name.strip().rpartition(".")
        kind = "schedulefree" if attr.lower().endswith("schedulefree") else ""
        return OptimizerSpec(name.strip(), f"{mod}:{attr}", mod.split(".")[0].replace("_", "-"), kind=kind)
    raise UserError(f"optimizer_type {name!r} is unknown. Use one of: " + ", ".join(known_names())
                    + ", or the dotted path of an optimizer class (e.g. came_pytorch.CAME).")


def known_names() -> List[str]:
    names = [s.name for s in OPTIMIZERS.values()]
    return names[:names.index("DAdaptAdamPreprint")] + ["DAdaptation"] + names[names.index("DAdaptAdamPreprint"):]


def recommended_args(name: str) -> List[str]:
    """The guide's arguments for an optimizer as ``key=value`` strings (what the UI pre-fills)."""
    try:
        spec = resolve(name)
    except UserError:
        return []
    return [f"{k}={format_value(v)}" for k, v in spec.recommended.items()]


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (tuple, list)):
        return ",".join(format_value(x) for x in v)
    return str(v)


# ------------------------------------------------------------------ arguments and checks
def optimizer_kwargs(spec: OptimizerSpec, args: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments the optimizer class gets (besides params and lr)."""
    bad = {k: v for k, v in spec.fixed.items() if k in args and args[k] != v}
    if bad:
        k = next(iter(bad))
        raise UserError(f"optimizer_args {k}={args[k]} contradicts optimizer_type {spec.name}, which means "
                        f"{k}={spec.fixed[k]}: remove it from optimizer_args.")
    kw = {**spec.implied, **args, **spec.fixed}
    if spec.kind == "adafactor":
        kw.setdefault("relative_step", True)
        if kw.get("warmup_init") and not kw["relative_step"]:
            log.info("AdaFactor: warmup_init=True needs relative_step=True; setting it (as sd-scripts does)")
            kw["relative_step"] = True
    return kw


def adafactor_relative_step(spec: OptimizerSpec, args: Dict[str, Any]) -> bool:
    return spec.kind == "adafactor" and bool(optimizer_kwargs(spec, args).get("relative_step"))


def check_arguments(spec: OptimizerSpec, cls: Callable, kwargs: Dict[str, Any]) -> List[str]:
    """Argument names and value types checked against the class' signature, each problem with its fix."""
    try:
        sig = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls)
    except (TypeError, ValueError):
        return []
    params = {n: p for n, p in sig.parameters.items() if n not in ("self", "params")}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    problems = []
    takes = ", ".join(n for n, p in params.items() if p.kind != p.VAR_POSITIONAL and n != "lr")
    for k, v in kwargs.items():
        if k == "lr":
            problems.append("optimizer_args lr=...: set the learning rate with learning_rate / unet_lr / "
                            "text_encoder_lr, not in optimizer_args.")
            continue
        p = params.get(k)
        if p is None:
            problems.append(f"optimizer_args {k}={format_value(v)}: {spec.name} has no argument '{k}'. "
                            f"It takes: {takes}.")
            continue
        d = p.default
        if d is inspect.Parameter.empty or d is None or v is None:
            continue
        if isinstance(d, bool):
            if not isinstance(v, bool):
                problems.append(f"optimizer_args {k}={format_value(v)}: {spec.name} wants True or False, "
                                f"e.g. {k}={format_value(d)}.")
        elif isinstance(d, (int, float)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"optimizer_args {k}={format_value(v)}: {spec.name} wants a number, "
                                f"e.g. {k}={format_value(d)}.")
        elif isinstance(d, tuple):
            if not isinstance(v, tuple) or len(v) != len(d) or not all(isinstance(x, (int, float)) for x in v):
                problems.append(f"optimizer_args {k}={format_value(v)}: {spec.name} wants {len(d)} numbers "
                                f"separated by commas, e.g. {k}={format_value(d)}.")
    return problems


def bnb_device_problem(spec: OptimizerSpec, device: torch.device) -> Optional[str]:
    """An 8-bit bitsandbytes optimizer that cannot run on ``device``, with what to do instead."""
    if spec.kind != "bnb8bit" or torch.device(device).type == "cuda":
        return None
    try:
        import bitsandbytes
        version = getattr(bitsandbytes, "__version__", "0")
    except Exception:
        return None  # reported by load()
    if _version_tuple(version) < (0, 50):
        return (f"optimizer_type {spec.name}: bitsandbytes {version} runs its 8-bit optimizers only on NVIDIA "
                f"GPUs, and this run is on {torch.device(device).type}. Pick AdamW (or Lion) here, or install "
                "bitsandbytes >= 0.50 (needs torch >= 2.4), which also runs them on the CPU.")
    return None


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def preflight(name: str, args: Dict[str, Any], device="cpu") -> List[str]:
    """Every problem with this optimizer choice, found before any model work: unknown name, missing
    package, device support, argument names/types, values the class refuses."""
    try:
        spec = resolve(name)
        cls = spec.load()
        kwargs = optimizer_kwargs(spec, args)
    except UserError as e:
        return [str(e)]
    p = bnb_device_problem(spec, device)
    if p:
        return [p]
    problems = check_arguments(spec, cls, {k: v for k, v in kwargs.items() if k not in spec.fixed or k in args})
    if problems:
        return problems
    if spec.kind == "bnb8bit":
        return []  # its constructor is cheap to get wrong only on values; bnb checks them at step time
    try:  # a dry construction catches values the class refuses (betas out of range, lr with relative_step...)
        dummy = [torch.nn.Parameter(torch.zeros(1))]
        _construct(spec, cls, [{"params": dummy, "lr": 1e-3}], 1e-3, kwargs)
    except UserError as e:
        return [str(e)]
    return []


# ------------------------------------------------------------------ creation
def _construct(spec: OptimizerSpec, cls, groups: List[dict], lr: float, kwargs: Dict[str, Any]):
    try:
        if spec.kind == "adafactor" and kwargs.get("relative_step"):
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
            return cls(groups, lr=None, **kwargs)
        return cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"optimizer_args do not fit {spec.name}: {e}. Check the argument names and values.") from None
    except ValueError as e:
        raise UserError(f"{spec.name} refused its settings: {e}. Fix optimizer_args or the learning rate.") from None


def create_optimizer(name: str, param_groups: List[dict], lr: float, args: Dict[str, Any], *,
                     warn: bool = True) -> torch.optim.Optimizer:
    spec = resolve(name)
    cls = spec.load()
    kwargs = optimizer_kwargs(spec, args)
    device = next((p.device for g in param_groups for p in g["params"]), torch.device("cpu"))
    problem = bnb_device_problem(spec, device)
    if problem:
        raise UserError(problem)
    problems = check_arguments(spec, cls, {k: v for k, v in kwargs.items() if k not in spec.fixed or k in args})
    if problems:
        raise UserError(" ".join(problems))
    for w in lr_warnings(spec, [g.get("lr", lr) for g in param_groups], args) if warn else []:
        log.warning(w)
    groups = [dict(g) for g in param_groups]  # torch keeps extra keys such as "name" in each group
    if spec.adaptive:  # one learning rate (most of them raise on differing non-zero group lrs)
        nonzero = [g.get("lr", lr) for g in groups if g.get("lr", lr)]
        for g in groups:
            if g.get("lr", lr):
                g["lr"] = nonzero[-1]
    opt = None
    if device.type == "cuda" and cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD) \
            and "fused" not in args and "foreach" not in args:
        try:   # one fused kernel for all LoRA tensors instead of a launch per tensor (a step is launch-bound)
            opt = _construct(spec, cls, groups, lr, dict(kwargs, fused=True))
        except (UserError, RuntimeError):
            opt = None   # a torch without fused kernels for these: its default (foreach)
    if opt is None:
        opt = _construct(spec, cls, groups, lr, kwargs)
    opt._lora_trainer_spec = spec  # type: ignore[attr-defined]
    return opt


def lr_warnings(spec: OptimizerSpec, lrs: List[float], args: Dict[str, Any]) -> List[str]:
    out = []
    if spec.adaptive:
        nonzero = [x for x in lrs if x]
        if len(set(nonzero)) > 1:
            out.append(f"{spec.name} adapts its own step size and takes one learning rate, but unet_lr and "
                       f"text_encoder_lr differ ({', '.join(str(x) for x in lrs)}): {nonzero[-1]} (the UNet's) is "
                       "used for both. Set text_encoder_lr = unet_lr (1.0 is usual) to silence this.")
        low = [x for x in lrs if x is not None and 0 < x <= 0.1]
        if low:
            out.append(f"{spec.name}: learning rate {low[0]} is very low for an adaptive optimizer; the guide uses "
                       "0.5-2.0 (1.0).")
    if spec.kind == "adafactor" and adafactor_relative_step(spec, args) and len(set(lrs)) > 1:
        out.append("AdaFactor with relative_step ignores unet_lr and text_encoder_lr; learning_rate only sets the "
                   "reported initial value.")
    return out


def is_schedule_free(optimizer) -> bool:
    spec = getattr(optimizer, "_lora_trainer_spec", None)
    if spec is not None:
        return spec.schedule_free
    return type(optimizer).__name__.lower().endswith("schedulefree")


@contextlib.contextmanager
def eval_mode(optimizer) -> Iterator[None]:
    """A schedule-free optimizer's evaluation weights for the duration (sampling, saving); no-op otherwise."""
    if optimizer is None or not is_schedule_free(optimizer) or not hasattr(optimizer, "eval"):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def train_mode(optimizer) -> None:
    if optimizer is not None and is_schedule_free(optimizer) and hasattr(optimizer, "train"):
        optimizer.train()
