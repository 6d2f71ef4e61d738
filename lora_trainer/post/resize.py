"""Resize: lower a LoRA's rank by SVD, as sd-scripts' ``networks/resize_lora.py``.

Each module's ΔW is factored (without forming it: QR of up and down, SVD of the small core) and
cut to a rank: ``new_rank`` for all (``new_conv_rank`` for conv modules), or per module by
``dynamic_method`` (sv_ratio / sv_cumulative / sv_fro with ``dynamic_param``), never above
``new_rank``; the ranks are sd-scripts' (:mod:`resize_rank`: one singular value more than the target
needs). As in sd-scripts the singular values go into ``lora_up`` and the new alpha is
``old_scale · new_rank``, so ``alpha / rank`` (the strength at weight 1) is unchanged.

LyCORIS files (LoHa, LoKr, LoCon with CP, full/diff) have no up/down factors to cut: their modules'
ΔW is formed by the WebUI's rule and factored the same way, so the output is a plain LoRA
(``ss_network_module`` networks.lora) of the asked rank whose ΔW is the best approximation of the
input's; the report says so. Conv layers get a proper kernel in ``lora_down`` even where LyCORIS
saved the factors flattened (:func:`lora_math.layer_shape_of`). A plain LoRA holds no bias: the
bias changes of ``full`` modules are left out (the report counts them); norm modules (``w_norm``,
``b_norm``) are copied as they are. IA3, OFT and DoRA change a layer relative to the checkpoint's
weights, which resize does not see: refused, with the way round (merge, then extract).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import UserError
from ..io.lora_file import SAVE_DTYPES, save_lora
from .files import check_output, finite_or_raise, output_metadata, read_lora
from .lora_math import layer_shape_of, module_delta, module_svd, require_known, retained, scale_of, to_lora
from .resize_rank import MIN_SV, check_dynamic, full_rank, resize_rank

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int, int, str], None]]


@dataclass
class ModuleResize:
    name: str
    old_rank: Optional[int]
    new_rank: int
    fro: float          # share of ΔW's Frobenius norm kept
    sum: float          # share of the sum of singular values kept
    capped: bool        # the dynamic method wanted more than new_rank
    zero: bool          # ΔW was all zero
    algo: str = "lora"  # the input module's type (registry name)


@dataclass
class ResizeReport:
    input: Path
    output: Path
    method: Optional[str]
    param: Optional[float]
    new_rank: Optional[int]
    new_conv_rank: Optional[int]
    precision: str
    modules: List[ModuleResize] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    converted: Dict[str, int] = field(default_factory=dict)  # LyCORIS type label -> modules turned into LoRA
    notes: List[str] = field(default_factory=list)

    def summary(self) -> List[str]:
        ms = [m for m in self.modules if not m.zero]
        out = []
        if self.converted:
            what = ", ".join(f"{n} {label}" for label, n in self.converted.items())
            out.append(f"converted to a plain LoRA: {what} modules re-factored by SVD of their ΔW (the WebUI's rule); "
                       "the new file is a plain LoRA (ss_network_module networks.lora), not a LyCORIS file")
        if ms:
            ranks = [m.new_rank for m in ms]
            worst = min(ms, key=lambda m: m.fro)
            out.append(f"{len(self.modules)} modules; rank {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}); "
                       f"Frobenius norm kept: mean {100 * sum(m.fro for m in ms) / len(ms):.1f}%, "
                       f"min {100 * worst.fro:.1f}% ({worst.name})")
        capped = [m for m in self.modules if m.capped]
        if capped:
            out.append(f"{len(capped)} modules needed more than new_rank {self.new_rank} to reach "
                       f"{self.method} {self.param}; they keep rank {self.new_rank} (raise new_rank to keep more)")
        zero = [m for m in self.modules if m.zero]
        if zero:
            out.append(f"{len(zero)} modules are all zero (untrained); kept at rank 1")
        out += self.notes
        out.append(f"size {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB ({self.precision}); "
                   f"{self.seconds:.1f}s")
        return out

    def lines(self, per_module: bool = True) -> List[str]:
        how = f"{self.method} {self.param}" if self.method else "fixed rank"
        cap = f", max rank {self.new_rank}" if self.new_rank else ""
        conv = f", conv rank {self.new_conv_rank}" if self.new_conv_rank else ""
        out = [f"resize {self.input.name} -> {self.output} ({how}{cap}{conv}, {self.precision})"]
        if per_module:
            width = max((len(m.name) for m in self.modules), default=10)
            out.append(f"  {'module':<{width}}  rank        Frobenius kept")
            for m in self.modules:
                flag = "  (capped)" if m.capped else ("  (zero)" if m.zero else "")
                out.append(f"  {m.name:<{width}}  {str(m.old_rank or '?'):>4} -> {m.new_rank:<4} {100 * m.fro:6.2f}%{flag}")
        return out + ["summary: " + s for s in self.summary()]


def resize_lora(model, save_to, *, new_rank: Optional[int] = None, new_conv_rank: Optional[int] = None,
                dynamic_method: Optional[str] = None, dynamic_param: Optional[float] = None,
                save_precision: Optional[str] = None, device: str = "cpu", overwrite: bool = False,
                progress: Progress = None) -> ResizeReport:
    """Resize ``model`` (a LoRA file) and write ``save_to``. ``save_precision`` None keeps the input's."""
    t0 = time.time()
    check_dynamic(dynamic_method, dynamic_param)
    if new_rank is None and dynamic_method is None:
        raise UserError("Give new_rank (e.g. 32), a dynamic_method (sv_fro, sv_ratio, sv_cumulative), or both.")
    for label, v in (("new_rank", new_rank), ("new_conv_rank", new_conv_rank)):
        if v is not None and int(v) < 1:
            raise UserError(f"{label} {v} must be at least 1.")
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise UserError(f"save_precision {save_precision!r} is unknown: use float, fp16 or bf16.")
    f = read_lora(model)
    require_known(f, "resize", without_base=True)
    finite_or_raise(f)
    out = check_output(save_to, [model], overwrite=overwrite)
    precision = save_precision or f.precision()
    report = ResizeReport(f.path, out, dynamic_method, dynamic_param, new_rank, new_conv_rank, precision,
                          bytes_before=f.path.stat().st_size)
    tensors: Dict[str, torch.Tensor] = {}
    alphas = set()
    total = len(f.modules)
    norms, no_bias = [], []
    with torch.no_grad():
        for i, (name, parts) in enumerate(f.modules.items()):
            algo = f.algos[name]
            if algo.name == "norm":  # a LoRA's ΔW cannot hold it; the WebUI reads it in any file
                for part, t in parts.items():
                    tensors[f"{name}.{part}"] = t
                norms.append(name)
                continue
            bias = algo.bias(parts) if algo.bias else None
            if bias is not None and bool(bias.any()):
                no_bias.append(name)
            old_rank = algo.rank(parts) if algo.rank else None
            shape = algo.shape(parts) if algo.shape else tuple(module_delta(parts, algo).shape)
            svd = module_svd(parts, algo, device, layer_shape_of(name, shape, f.kind))
            conv = len(svd.shape) == 4  # sd-scripts: every conv module (1x1 too) takes new_conv_rank
            full = full_rank(svd.shape)
            cap = (new_conv_rank if conv and new_conv_rank else new_rank) or full
            old_scale = scale_of(parts, old_rank) if old_rank else 1.0
            r, wanted = resize_rank(svd.S, full=full, cap=cap, method=dynamic_method, param=dynamic_param,
                                    scale=old_scale)
            zero = len(svd.S) == 0 or float(svd.S[0]) / (abs(old_scale) or 1.0) <= MIN_SV
            kept = retained(svd.S, r)
            up, down = _padded(*to_lora(svd, min(r, len(svd.S))), r)
            if old_scale != 0:
                up, alpha = up / old_scale, old_scale * r  # keep alpha/rank: weights stay in the input's range
            else:
                up, alpha = torch.zeros_like(up), 0.0
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
            if not zero and not conv:
                alphas.add(round(alpha, 6))
            report.modules.append(ModuleResize(name, old_rank, r, kept.fro, kept.sum, wanted > r, zero, algo.name))
            if algo.name != "lora":
                label = algo.label or algo.name
                report.converted[label] = report.converted.get(label, 0) + 1
            if progress:
                progress(i + 1, total, name)
    if norms:
        report.notes.append(f"{len(norms)} LyCORIS norm modules (w_norm, b_norm) were copied unchanged: a LoRA's "
                            "factors cannot hold them; the WebUI applies them from any file")
    if no_bias:
        report.notes.append(f"{len(no_bias)} modules also change their layer's bias (LyCORIS full diff_b); a plain "
                            "LoRA holds no bias, so those changes are left out. merge keeps them")
    old_dim = f.metadata.get("ss_network_dim") or str(max((m.old_rank or 0 for m in report.modules), default=0))
    md = dict(f.metadata)
    args = _network_args(md)
    if dynamic_method:
        comment = f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old_dim}" + (
            f" (max rank {new_rank})" if new_rank else "")
        md["ss_network_dim"] = md["ss_network_alpha"] = "Dynamic"
        if args is not None and "conv_dim" in args:
            args["conv_dim"] = args["conv_alpha"] = "Dynamic"
    else:
        conv_desc = f" (conv: {new_conv_rank})" if new_conv_rank and new_conv_rank != new_rank else ""
        comment = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}"
        md["ss_network_dim"] = str(new_rank)
        md["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
        if args is not None and "conv_dim" in args:
            conv_alphas = {round(float(tensors[f"{m.name}.alpha"]), 6) for m in report.modules
                           if tensors[f"{m.name}.lora_down.weight"].dim() == 4 and not m.zero}
            args["conv_dim"] = str(new_conv_rank or new_rank)
            args["conv_alpha"] = str(conv_alphas.pop()) if len(conv_alphas) == 1 else "Dynamic"
    if report.converted:
        md["ss_network_module"] = "networks.lora"
        args = None
        md.pop("ss_network_args", None)
        types = ", ".join(report.converted)
        comment = f"converted from {types} to a plain LoRA by SVD of ΔW; " + comment
    if args is not None:
        md["ss_network_args"] = json.dumps(args)
    note = {"tool": "resize", "input": f.name, "input_hash": f.metadata.get("sshs_model_hash"),
            "converted_from": sorted({m.algo for m in report.modules if m.algo != "lora"}) or None,
            "new_rank": new_rank, "new_conv_rank": new_conv_rank, "dynamic_method": dynamic_method,
            "dynamic_param": dynamic_param, "save_precision": precision}
    save_lora(out, tensors, output_metadata(md, out, note, comment), precision)
    report.bytes_after = out.stat().st_size
    report.seconds = time.time() - t0
    log.info("resized %s -> %s", f.path, out)
    return report


def _padded(up: torch.Tensor, down: torch.Tensor, rank: int):
    """``up``/``down`` grown to ``rank`` with zero components (a rank above the module's own: ΔW unchanged)."""
    extra = rank - down.shape[0]
    if extra <= 0:
        return up, down
    up = torch.cat([up, up.new_zeros((up.shape[0], extra) + tuple(up.shape[2:]))], 1)
    down = torch.cat([down, down.new_zeros((extra,) + tuple(down.shape[1:]))], 0)
    return up, down


def _network_args(md: Dict[str, str]) -> Optional[dict]:
    raw = md.get("ss_network_args")
    if not raw:
        return None
    try:
        args = json.loads(raw)
        return args if isinstance(args, dict) else None
    except ValueError:
        return None
