"""The math every post tool shares: ΔW of one saved module (a small registry keyed by the module's
key set), low-rank SVD, and the rank rules of sd-scripts' resize.

ΔW follows the WebUI's Lora loader (``network.py`` / ``network_*.py``). Plain LoRA / LoCon:
``up @ down`` reshaped to the layer's weight shape, times ``scale`` if the file has one, else
``alpha / rank`` if it has an alpha, else 1. The LyCORIS types (LoHa, LoKr, LoCon with CP/Tucker,
IA3, full/diff, OFT/BOFT, norm, and DoRA on LoRA/LoHa/LoKr) take their ΔW from
:func:`lora_trainer.networks.webui_math.updown`, the WebUI's rule, so no second copy of that math
lives here. The multiplier (prompt weight / merge ratio) is applied by the caller.

IA3, OFT and DoRA change the layer relative to its own weight: their ΔW needs that weight
(``Algorithm.needs_weight``), so only merge (which has the checkpoint) can use them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

Parts = Dict[str, torch.Tensor]  # one module's tensors by weight name: {"lora_up.weight": ..., "alpha": ...}

MIN_SV = 1e-12  # a module whose largest singular value is below this is treated as all-zero


@dataclass(frozen=True)
class Algorithm:
    """One network type as saved in a file. ``required``/``optional`` are the weight names after the
    module name (the part after the first dot of each key); ``accepts(parts)``, if given, is a further
    test (LoKr: ``lokr_w1`` or ``lokr_w1_a``+``lokr_w1_b``, and the same for w2).

    ``delta(parts)`` -> float32 ΔW with scale applied, in the layer's weight shape ((out, in) or
    (out, in, kh, kw); LyCORIS saves some conv factors flattened, then ΔW is (out, in·kh·kw)). With
    ``needs_weight`` (IA3, OFT, DoRA) it is ``delta(parts, weight)``: the layer's current weight
    (float32, layer shape) is part of the rule. ``factors(parts)`` (optional) -> ``(A, B)`` with
    ΔW = (A @ B).reshape(shape), A (out, r) carrying the scale and B (r, in·kh·kw); tools use it to
    avoid forming ΔW, and combine stacks them. ``shape(parts)``: ΔW's shape without forming it (None
    when only the layer knows). ``bias(parts)``: the change to the layer's bias (LyCORIS full
    ``diff_b``, norm ``b_norm``), not scaled, or None.
    """
    name: str
    required: FrozenSet[str]
    optional: FrozenSet[str]
    delta: Callable[..., torch.Tensor]
    factors: Optional[Callable[[Parts], Tuple[torch.Tensor, torch.Tensor]]] = None
    rank: Optional[Callable[[Parts], Optional[int]]] = None
    shape: Optional[Callable[[Parts], Tuple[int, ...]]] = None
    label: str = ""
    needs_weight: bool = False
    bias: Optional[Callable[[Parts], Optional[torch.Tensor]]] = None
    accepts: Optional[Callable[[Parts], bool]] = None

    def matches(self, parts) -> bool:
        keys = set(parts)
        return (self.required <= keys and keys <= (self.required | self.optional)
                and (self.accepts is None or self.accepts(parts)))


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


def module_delta(parts: Parts, algo: Optional[Algorithm] = None, weight: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """ΔW of one module (scale applied, multiplier not). ``weight``: the layer's current weight, which
    IA3/OFT/DoRA need (ValueError without it); other types ignore it."""
    algo = algo or detect_algorithm(parts)
    if algo is None:
        raise KeyError(describe_parts(parts))
    if algo.needs_weight:
        if weight is None:
            raise ValueError(f"{algo.label or algo.name}: ΔW depends on the layer's weight; pass it")
        return algo.delta(parts, weight.float())
    return algo.delta(parts)


# ------------------------------------------------------------------ LyCORIS types (the WebUI's rule)
def _webui(parts: Parts, weight: Optional[torch.Tensor], shape: Optional[Tuple[int, ...]] = None):
    """(ΔW, Δbias) by webui_math.updown. Types whose ΔW does not read the weight get a weightless
    stand-in of ΔW's own shape (the rule reads only its shape then)."""
    from ..networks.webui_math import updown
    if weight is None:
        weight = torch.empty(shape, device="meta")
    return updown(parts, weight)


def _plain(shape_fn):
    return lambda parts: _webui(parts, None, shape_fn(parts))[0]


def _with_weight(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    if "dora_scale" in parts:
        _check_dora(parts, weight)
    return _webui(parts, weight)[0]


def _check_dora(parts: Parts, weight: torch.Tensor) -> None:
    from ..errors import UserError
    ds = parts["dora_scale"]
    if weight.dim() < 2 or ds.shape[0] != 1 or ds.numel() != weight.shape[1]:
        raise UserError(f"dora_scale has shape {tuple(ds.shape)} for a layer of shape {tuple(weight.shape)}: the "
                        "WebUI reads DoRA's magnitude per input column (shape (1, in)); a per-output one (DoRA "
                        "trained with wd_on_output=True) it applies wrongly, so no merge matches both the training "
                        "and the WebUI. Train again with wd_on_output=False.")


def _hada_shape(p: Parts) -> Tuple[int, ...]:
    w1a, w1b = p["hada_w1_a"], p["hada_w1_b"]
    if "hada_t1" in p:
        return (w1a.shape[1], w1b.shape[1]) + tuple(p["hada_t1"].shape[2:])
    return (w1a.shape[0],) + tuple(w1b.shape[1:])


def _lokr_accepts(p: Parts) -> bool:
    return (("lokr_w1" in p) != ("lokr_w1_a" in p and "lokr_w1_b" in p)
            and ("lokr_w2" in p) != ("lokr_w2_a" in p and "lokr_w2_b" in p)
            and ("lokr_t2" not in p or "lokr_w2_a" in p))


def _lokr_shape(p: Parts) -> Tuple[int, ...]:
    w1 = tuple(p["lokr_w1"].shape) if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    if "lokr_w2" in p:
        w2 = tuple(p["lokr_w2"].shape)
    elif "lokr_t2" in p:  # CP: w2_a (r, out2), w2_b (r, in2), t2 (r, r, kh, kw)
        w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1]) + tuple(p["lokr_t2"].shape[2:])
    else:
        w2 = (p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1])
    return (w1[0] * w2[0], w1[1] * w2[1]) + w2[2:]


def _lokr_rank(p: Parts) -> Optional[int]:
    """The WebUI's ``dim`` of a LoKr module (alpha / dim is its scale): w2_b's rank, else w1_b's; None
    when both Kronecker factors are full matrices (the scale is then 1, whatever alpha says)."""
    for k in ("lokr_w2_b", "lokr_w1_b"):
        if k in p:
            return int(p[k].shape[0])
    return None


def _cp_lora_shape(p: Parts) -> Tuple[int, ...]:
    return (p["lora_up.weight"].shape[0], p["lora_down.weight"].shape[1]) + tuple(p["lora_mid.weight"].shape[2:])


def _cp_lora_factors(p: Parts) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoCon with a CP/Tucker core: ΔW[i,j,k,l] = Σ up[i,n] mid[n,m,k,l] down[m,j], so A = up (times the
    scale) and B = mid contracted with down, flattened to (r, in·kh·kw)."""
    up, down, mid = p["lora_up.weight"].float(), p["lora_down.weight"].float(), p["lora_mid.weight"].float()
    rank = down.shape[0]
    a = up.reshape(up.shape[0], -1) * scale_of(p, rank)
    b = torch.einsum("n m k l, m j -> n j k l", mid, down.reshape(rank, -1)).reshape(mid.shape[0], -1)
    return a, b


_SCALES = frozenset({"alpha", "scale"})
_LORA = ALGORITHMS["lora"]
_CP_LORA = Algorithm(
    name="lora-cp", label="LoCon with CP/Tucker decomposition",
    required=frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}), optional=_SCALES,
    delta=_plain(_cp_lora_shape), factors=_cp_lora_factors, rank=lambda p: int(p["lora_down.weight"].shape[0]),
    shape=_cp_lora_shape)
_LOHA = Algorithm(
    name="loha", label="LoHa", required=frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    optional=_SCALES | {"hada_t1", "hada_t2"}, delta=_plain(_hada_shape),
    rank=lambda p: int(p["hada_w1_b"].shape[0]), shape=_hada_shape)
_LOKR = Algorithm(
    name="lokr", label="LoKr", required=frozenset(),
    optional=_SCALES | {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    accepts=_lokr_accepts, delta=_plain(_lokr_shape), rank=_lokr_rank, shape=_lokr_shape)
for _algo in (_CP_LORA, _LOHA, _LOKR):
    register_algorithm(_algo)
register_algorithm(Algorithm(
    name="full", label="LyCORIS full (diff)", required=frozenset({"diff"}), optional=_SCALES | {"diff_b"},
    delta=_plain(lambda p: tuple(p["diff"].shape)), shape=lambda p: tuple(p["diff"].shape),
    bias=lambda p: p["diff_b"].float() if "diff_b" in p else None))
register_algorithm(Algorithm(
    name="norm", label="LyCORIS norm (w_norm, b_norm)", required=frozenset({"w_norm", "b_norm"}),
    optional=frozenset(), delta=_plain(lambda p: tuple(p["w_norm"].shape)), shape=lambda p: tuple(p["w_norm"].shape),
    bias=lambda p: p["b_norm"].float()))
register_algorithm(Algorithm(
    name="ia3", label="IA3", required=frozenset({"weight"}), optional=frozenset({"on_input"}),
    delta=_with_weight, needs_weight=True))
register_algorithm(Algorithm(
    name="oft", label="OFT / BOFT", required=frozenset({"oft_blocks"}), optional=frozenset({"alpha", "rescale"}),
    delta=_with_weight, needs_weight=True))
for _algo in (_LORA, _CP_LORA, _LOHA, _LOKR):  # DoRA: the same factors plus a magnitude per input column
    register_algorithm(Algorithm(
        name=_algo.name + "+dora", label=f"{_algo.label} with DoRA", required=_algo.required | {"dora_scale"},
        optional=_algo.optional, accepts=_algo.accepts, delta=_with_weight, needs_weight=True, rank=_algo.rank,
        shape=_algo.shape))
del _algo


def require_known(f, what: str, *, without_base: bool = False) -> None:
    """UserError unless every module of LoRA file ``f`` has a registered type; with ``without_base``
    (tools that see the file alone) also unless ΔW can be formed without the checkpoint."""
    from ..errors import UserError
    unknown = {n: describe_parts(f.modules[n]) for n, a in f.algos.items() if a is None}
    if unknown:
        name, desc = next(iter(unknown.items()))
        known = ", ".join(sorted({a.label or a.name for a in ALGORITHMS.values()}))
        raise UserError(f"{f.name}: {len(unknown)} modules are {desc}, which {what} does not handle (e.g. {name}). "
                        f"Known types: {known}. Nothing was written.")
    if without_base:
        weighted = {n: a for n, a in f.algos.items() if a.needs_weight}
        if weighted:
            name, algo = next(iter(weighted.items()))
            raise UserError(f"{f.name}: {len(weighted)} modules are {algo.label} (e.g. {name}), whose change depends "
                            f"on the checkpoint's own weights, so {what} cannot work from the file alone. Merge it "
                            "into its checkpoint (merge), then extract a plain LoRA from the merged and the base "
                            "checkpoint (extract). Nothing was written.")


# ------------------------------------------------------------------ layer shapes without the model
_CONV3X3 = re.compile(r"^lora_unet_(input_blocks_0_0|out_2|conv_in|conv_out|.*_(in_layers_2|out_layers_3|op|conv|"
                      r"conv1|conv2))$")
_CONV1X1 = re.compile(r"^lora_unet_.*_(skip_connection|conv_shortcut)$")
_PROJ = re.compile(r"^lora_unet_.*_(proj_in|proj_out)$")


def layer_shape_of(name: str, shape: Tuple[int, ...], kind: Optional[str]) -> Tuple[int, ...]:
    """The layer's weight shape for a ΔW of ``shape``. LyCORIS saves LoHa and decomposed-LoKr factors of
    conv layers flattened (ΔW (out, in·kh·kw)); a plain LoRA needs the kernel in ``lora_down``. The
    UNet's convs are known by name: ResBlock/Downsample/Upsample and the edge convs are 3×3, skip
    connections 1×1, and SD1's transformer proj_in/out 1×1 (SD2/SDXL: Linear). Anything else keeps
    its shape (the WebUI reshapes a flat ΔW to the layer anyway)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        return shape
    out, n = shape
    if _CONV3X3.match(name) and n % 9 == 0:
        return (out, n // 9, 3, 3)
    if _CONV1X1.match(name) or (kind == "sd1" and _PROJ.match(name)):
        return (out, n, 1, 1)
    return shape


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


def module_svd(parts: Parts, algo: Algorithm, device: str = "cpu", shape: Optional[Tuple[int, ...]] = None) -> SVD:
    """SVD of one module's ΔW (low-rank when the type has factors, else of the formed ΔW). ``shape``:
    the layer shape to give the result (same size as ΔW), e.g. from :func:`layer_shape_of`."""
    if algo.factors is not None:
        a, b = algo.factors(parts)
        u, s, vh = lowrank_svd(a.to(device), b.to(device))
        shape = shape or (algo.shape(parts) if algo.shape else tuple(algo.delta(parts).shape))
        return SVD(u, s, vh, tuple(shape))
    w = module_delta(parts, algo)
    return full_svd(w.reshape(shape) if shape else w, device)


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


# ------------------------------------------------------------------ rank (combine; resize's rule is resize_rank.py)
def select_rank(S: torch.Tensor, cap: int) -> int:
    """``cap``, but no more singular values than there are; an all-zero module keeps rank 1."""
    s = S.double().cpu()
    n = len(s)
    if n == 0 or s[0] <= MIN_SV:
        return 1
    return max(1, min(cap, n))


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
