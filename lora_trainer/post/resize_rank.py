"""The rank ``resize`` keeps per module: sd-scripts' rule (``networks/resize_lora.py``), so the same flags
give the same ranks and alphas as sd-scripts.

sd-scripts takes the full SVD of each module's ``lora_up @ lora_down`` (``min(out, in·kh·kw)`` singular
values ``S``, largest first) and, with a ``dynamic_method``, first counts singular values:

- ``sv_ratio``: the values above ``S[0] / dynamic_param``;
- ``sv_cumulative``: the position where ``cumsum(S) / sum(S)`` first reaches ``dynamic_param``, plus 1;
- ``sv_fro``: the position where ``cumsum(S²) / sum(S²)`` first reaches ``dynamic_param²``, plus 1.

That count (already the smallest rank that meets the target) is held between 1 and ``len(S) - 1``, and
then 1 more is added: sd-scripts keeps **one singular value more** than the target needs (so at least 2).
Without a method the rank is ``new_rank``. Then a module whose largest singular value is at most 1e-6
(of ``lora_up @ lora_down``, before alpha) keeps rank 1, and no module keeps more than ``new_rank``
(``new_conv_rank`` for every conv module, 1×1 ones included, as sd-scripts decides by ``lora_down``
having 4 dimensions). Alpha becomes ``alpha / old_rank · new_rank``.

Where sd-scripts would stop with an error, here the rank is held at ``len(S)`` (a layer cannot hold
more): ``new_rank`` above a layer's full rank. A rank above the module's old rank is reached with
zero components (sd-scripts' extra components are rounding noise), so ΔW stays the same.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
MIN_SV = 1e-6  # sd-scripts: a module whose largest singular value is at most this is all-zero (rank 1)


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


def full_rank(shape: Tuple[int, ...]) -> int:
    """How many singular values the full SVD of a layer of weight shape ``shape`` has: min(out, in·kh·kw)."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return min(int(shape[0]), n)


def resize_rank(S: torch.Tensor, *, full: int, cap: int, method: Optional[str] = None,
                param: Optional[float] = None, scale: float = 1.0) -> Tuple[int, int]:
    """``(rank, wanted)``: the rank sd-scripts keeps for a module, and the rank it would keep without
    the ``cap`` (``new_rank`` / ``new_conv_rank``).

    ``S``: the singular values of the module's ΔW, largest first; fewer than ``full`` when ΔW is known
    to be of low rank (the rest are zero). ``full``: :func:`full_rank` of the layer. ``scale``: the
    module's alpha / old rank, already in ``S`` (the all-zero test is on ΔW before it, as sd-scripts')."""
    s = S.detach().double().cpu().flatten()
    full = max(1, int(full))
    if len(s) < full:  # the singular values a full SVD would add are zero
        s = torch.cat([s, s.new_zeros(full - len(s))])
    s = s[:full]
    if method is None:
        rank = int(cap)
    else:
        if method == "sv_ratio":
            count = int((s > s[0] / param).sum())
        elif method == "sv_cumulative":
            count = _first_reaching(torch.cumsum(s, 0) / s.sum(), param) + 1
        elif method == "sv_fro":
            sq = s * s
            count = _first_reaching(torch.cumsum(sq, 0) / sq.sum(), param * param) + 1
        else:
            raise ValueError(method)
        rank = max(1, min(count, full - 1)) + 1
    wanted = rank
    top = float(s[0]) if len(s) else 0.0
    if top / (abs(scale) if scale else 1.0) <= MIN_SV:
        rank = wanted = 1
    elif rank > cap:
        rank = int(cap)
    return max(1, min(rank, full)), max(1, min(wanted, full))


def _first_reaching(cum: torch.Tensor, target: float) -> int:
    """The first position whose value is >= ``target`` (``len(cum)`` if none): torch.searchsorted's left side."""
    return int(torch.searchsorted(cum.contiguous(), torch.tensor([float(target)], dtype=cum.dtype))[0])
