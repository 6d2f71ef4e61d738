"""The math every post tool shares: ΔW of one saved module (a small registry keyed by the module's
key set, so LyCORIS algorithms can join), low-rank SVD, and the rank rules of sd-scripts' resize.

ΔW follows the WebUI's Lora loader (``network.py`` / ``network_lora.py``): ``up @ down`` reshaped to
the layer's weight shape, times ``scale`` if the file has one, else ``alpha / rank`` if it has an
alpha, else 1. The multiplier (prompt weight / merge ratio) is applied by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

Parts = Dict[str, torch.Tensor]  # one module's tensors by weight name: {"lora_up.weight": ..., "alpha": ...}

MIN_SV = 1e-12  # a module whose largest singular value is below this is treated as all-zero


@dataclass(frozen=True)
class Algorithm:
    """One network type as saved in a file. ``required``/``optional`` are the weight names after the
    module name (the part after the first dot of each key).

    ``delta(parts)`` -> float32 ΔW with scale applied, in the layer's weight shape ((out, in) or
    (out, in, kh, kw)). ``factors(parts)`` (optional) -> ``(A, B)`` with ΔW = (A @ B).reshape(shape),
    A (out, r) carrying the scale and B (r, in·kh·kw); tools use it to avoid forming ΔW.
    """
    name: str
    required: FrozenSet[str]
    optional: FrozenSet[str]
    delta: Callable[[Parts], torch.Tensor]
    factors: Optional[Callable[[Parts], Tuple[torch.Tensor, torch.Tensor]]] = None
    rank: Optional[Callable[[Parts], int]] = None
    shape: Optional[Callable[[Parts], Tuple[int, ...]]] = None
    label: str = ""

    def matches(self, parts) -> bool:
        keys = set(parts)
        return self.required <= keys and keys <= (self.required | self.optional)


ALGORITHMS: Dict[str, Algorithm] = {}


def register_algorithm(algo: Algorithm) -> None:
    """Add a network type (e.g. LoHa: ``hada_w1_a`` ...). Later registrations are tried first."""
    ALGORITHMS[algo.name] = algo


def detect_algorithm(parts) -> Optional[Algorithm]:
    for algo in reversed(list(ALGORITHMS.values())):
        if algo.matches(parts):
            return algo
    return None


# Names of other networks' weights, only to say what a file is when no algorithm accepts it.
_KNOWN_FOREIGN = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("oft_", "OFT"), ("dora_scale", "DoRA"),
                  ("lora_mid", "LoCon with CP/Tucker decomposition (use_cp)"), ("diff", "LyCORIS full (diff)"),
                  ("w_norm", "LyCORIS norm"), ("b_norm", "LyCORIS norm"), ("on_input", "IA3"),
                  ("glora", "GLoRA"), ("lora_A", "PEFT-style LoRA"), ("dyn_", "DyLoRA"))


def describe_parts(parts) -> str:
    for needle, label in _KNOWN_FOREIGN:
        if any(needle in p for p in parts):
            return label
    return "unknown (" + ", ".join(sorted(parts)) + ")"


def scale_of(parts: Parts, rank: int) -> float:
    """The WebUI's rule: ``scale`` tensor, else alpha / rank, else 1 (alpha 0 really means scale 0 there)."""
    if "scale" in parts:
        return float(parts["scale"])
    if "alpha" in parts:
        return float(parts["alpha"]) / rank
    return 1.0


def layer_shape(parts: Parts) -> Tuple[int, ...]:
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    return (up.shape[0],) + tuple(down.shape[1:])


def _lora_factors(parts: Parts) -> Tuple[torch.Tensor, torch.Tensor]:
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    rank = down.shape[0]
    a = up.float().reshape(up.shape[0], -1)
    if a.shape[1] != rank:
        raise ValueError(f"lora_up has {a.shape[1]} columns, lora_down {rank} rows")
    return a * scale_of(parts, rank), down.float().reshape(rank, -1)


def _lora_delta(parts: Parts) -> torch.Tensor:
    a, b = _lora_factors(parts)
    return (a @ b).reshape(layer_shape(parts))


register_algorithm(Algorithm(
    name="lora", label="LoRA / LoCon", required=frozenset({"lora_up.weight", "lora_down.weight"}),
    optional=frozenset({"alpha", "scale"}), delta=_lora_delta, factors=_lora_factors,
    rank=lambda p: int(p["lora_down.weight"].shape[0]), shape=layer_shape))


def module_delta(parts: Parts, algo: Optional[Algorithm] = None) -> torch.Tensor:
    algo = algo or detect_algorithm(parts)
    if algo is None:
        raise KeyError(describe_parts(parts))
    return algo.delta(parts)


# ------------------------------------------------------------------ SVD
@dataclass
class SVD:
    """ΔW (flattened to 2-D) = U diag(S) Vh; ``shape`` is the layer's weight shape."""
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: Tuple[int, ...]


def lowrank_svd(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``a @ b`` (a: m×r, b: r×n) without forming it: QR of both factors, SVD of the
    small core. Exact up to rounding; S has min(m, n, r) entries."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, vh @ qb.T


def module_svd(parts: Parts, algo: Algorithm, device: str = "cpu") -> SVD:
    if algo.factors is not None:
        a, b = algo.factors(parts)
        u, s, vh = lowrank_svd(a.to(device), b.to(device))
        shape = algo.shape(parts) if algo.shape else tuple(algo.delta(parts).shape)
        return SVD(u, s, vh, shape)
    w = algo.delta(parts)
    return full_svd(w, device)


def full_svd(w: torch.Tensor, device: str = "cpu") -> SVD:
    m = w.float().reshape(w.shape[0], -1).to(device)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return SVD(u, s, vh, tuple(w.shape))


def to_lora(svd: SVD, rank: int, *, split: str = "up") -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) of rank ``rank`` from an SVD, in the file's shapes (conv: down keeps the
    kernel, up is 1×1). ``split="up"`` puts the singular values into up (sd-scripts' choice);
    ``"sqrt"`` splits them evenly (a smaller range for fp16)."""
    u, s, vh = svd.U[:, :rank], svd.S[:rank], svd.Vh[:rank]
    if split == "sqrt":
        r = s.sqrt()
        up, down = u * r, r[:, None] * vh
    else:
        up, down = u * s, vh
    out = svd.shape[0]
    if len(svd.shape) == 4:
        return (up.reshape(out, rank, 1, 1).contiguous().cpu(),
                down.reshape(rank, *svd.shape[1:]).contiguous().cpu())
    return up.contiguous().cpu(), down.contiguous().cpu()


# ------------------------------------------------------------------ rank rules (sd-scripts resize_lora)
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


def check_dynamic(method: Optional[str], param: Optional[float]) -> None:
    from ..errors import UserError
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise UserError(f"dynamic_method {method!r} is unknown: use one of {', '.join(DYNAMIC_METHODS)}.")
    if param is None:
        raise UserError(f"dynamic_method {method} needs dynamic_param (e.g. sv_fro 0.9, sv_ratio 2).")
    if method == "sv_ratio" and not param >= 1:
        raise UserError(f"dynamic_param {param} for sv_ratio must be >= 1 (largest / smallest kept singular value).")
    if method in ("sv_cumulative", "sv_fro") and not 0 < param <= 1:
        raise UserError(f"dynamic_param {param} for {method} must be in (0, 1] (the share to keep, e.g. 0.9).")


def select_rank(S: torch.Tensor, cap: int, method: Optional[str] = None, param: Optional[float] = None) -> int:
    """The rank to keep: ``cap`` without a method; else the smallest rank that meets the target
    (sv_fro: kept Frobenius norm >= param; sv_cumulative: kept sum of singular values >= param;
    sv_ratio: singular values > S_max / param), never above ``cap``. An all-zero module keeps rank 1.

    sd-scripts keeps one or two ranks more than the target needs (an index off by one, then +1);
    here the rank is the smallest that meets it."""
    s = S.double().cpu()
    n = len(s)
    if n == 0 or s[0] <= MIN_SV:
        return 1
    if method is None:
        r = cap
    elif method == "sv_ratio":
        r = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        cum = torch.cumsum(s, 0) / s.sum()
        r = int((cum < param).sum()) + 1
    elif method == "sv_fro":
        sq = s * s
        cum = torch.cumsum(sq, 0) / sq.sum()
        r = int((cum < param * param).sum()) + 1
    else:
        raise ValueError(method)
    return max(1, min(r, cap, n))


@dataclass
class Retained:
    fro: float       # ||kept|| / ||all|| (Frobenius)
    sum: float       # sum of kept singular values / sum of all
    max_ratio: float  # S_max / smallest kept S


def retained(S: torch.Tensor, rank: int) -> Retained:
    s = S.double().cpu()
    total_sq, total = float((s * s).sum()), float(s.sum())
    if total <= 0:
        return Retained(1.0, 1.0, 1.0)
    kept = s[:rank]
    last = float(kept[-1]) if len(kept) else 0.0
    return Retained(float((kept * kept).sum() / total_sq) ** 0.5, float(kept.sum() / total),
                    float(s[0] / last) if last > 0 else float("inf"))
