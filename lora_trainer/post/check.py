"""Check: look inside a LoRA file for dead or broken tensors, as sd-scripts' ``check_lora_weights.py``
but with a verdict.

Per module: type, rank, alpha, ‖ΔW‖, mean and min |w| of each tensor, all-zero tensors, NaN/Inf, for
plain LoRA/LoCon and the LyCORIS types alike (ΔW by the WebUI's rule; IA3, OFT and DoRA change a
layer relative to its weight, which a file alone does not hold, so for them ‖ΔW‖ is not given and a
module is zero when one of its trained tensors is). The summary tells the expected case from real
damage:
- clip skip N leaves the last N-1 text-encoder layers untrained (their outputs are never used; at
  SD2's "penultimate" layer and SDXL's first encoder the last layer is always unused). Their
  ``lora_up`` stays at its zero initialisation: harmless.
- zero modules elsewhere, or many values flushed to zero/subnormal in an fp16 file, mean fp16
  underflow (or a part that never trained); NaN/Inf mean the training diverged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set

import torch

from ..io.hashes import addnet_hash_file
from .files import KIND_NAMES, LoRAFile, fmt_list, is_text_encoder, module_counts, read_lora
from .lora_math import module_delta

FP16_TINY = 2.0 ** -14  # below this fp16 values are subnormal (precision lost), below 2**-24 they are zero
# settings and side tensors: a zero there is no sign of damage (IA3's on_input is a flag, a zero diff_b is
# an untouched bias, DoRA's magnitude and OFT's rescale are not deltas)
SIDE_PARTS = frozenset({"alpha", "scale", "on_input", "dora_scale", "rescale", "diff_b", "b_norm"})


@dataclass
class TensorCheck:
    part: str
    shape: tuple
    dtype: str
    mean_abs: float
    min_abs: float
    zero: bool            # every value exactly 0
    zero_frac: float      # share of exact zeros
    tiny_frac: float      # share of fp16 subnormals (fp16 files only)
    nan: int
    inf: int


@dataclass
class ModuleCheck:
    name: str
    algo: str
    rank: Optional[int]
    alpha: Optional[float]
    delta_norm: Optional[float]
    tensors: List[TensorCheck]
    status: str = "ok"   # ok | zero-expected | zero | nonfinite | unknown
    note: str = ""
    bias_norm: Optional[float] = None  # ‖Δbias‖ of types that change the bias too (full diff_b, norm b_norm)

    @property
    def nonfinite(self) -> bool:
        return any(t.nan or t.inf for t in self.tensors)

    @property
    def zero(self) -> bool:
        if self.delta_norm is not None:
            return self.delta_norm == 0.0 and not self.bias_norm
        return any(t.zero for t in self.tensors if t.part not in SIDE_PARTS)

    @property
    def smallest(self) -> Optional[TensorCheck]:
        """lora_up (where fp16 underflow shows first), else the trained tensor with the smallest mean |w|."""
        up = next((t for t in self.tensors if t.part == "lora_up.weight"), None)
        if up is not None:
            return up
        main = [t for t in self.tensors if t.part not in SIDE_PARTS and t.dtype != "bool" and len(t.shape)]
        return min(main, key=lambda t: t.mean_abs, default=None)


@dataclass
class CheckReport:
    path: Path
    kind: Optional[str]
    dtype: str
    clip_skip: int
    modules: List[ModuleCheck] = field(default_factory=list)
    summary: List[str] = field(default_factory=list)
    verdict: str = "ok"   # ok | damaged

    @property
    def damaged(self) -> bool:
        return self.verdict == "damaged"

    def lines(self, per_module: bool = True) -> List[str]:
        out = [f"check {self.path.name}: {KIND_NAMES.get(self.kind, 'unknown model kind')}, {self.dtype}, "
               f"{len(self.modules)} modules"]
        if per_module:
            width = max((len(m.name) for m in self.modules), default=10)
            types = {m.algo for m in self.modules}
            algo_col = len(types) > 1 or types - {"lora"}
            tw = max((len(m.algo) for m in self.modules), default=4) if algo_col else 0
            head = f"{'type':<{tw}} " if algo_col else ""
            # lora_up where every module has one, else each module's trained tensor with the smallest mean |w|
            part = "up" if all(any(t.part == "lora_up.weight" for t in m.tensors) for m in self.modules) else "min-part"
            out.append(f"  {'module':<{width}}  {head}rank alpha     |dW|       {part + ' mean|w|':>11}  "
                       f"{part + ' min|w|':>9}  status")
            for m in self.modules:
                up = m.smallest
                norm = f"{m.delta_norm:10.4g}" if m.delta_norm is not None else "         ?"
                alpha = f"{m.alpha:<8g}" if m.alpha is not None else "-       "
                ups = f"{up.mean_abs:10.3g} {up.min_abs:10.3g}" if up else " " * 21
                algo = f"{m.algo:<{tw}} " if algo_col else ""
                out.append(f"  {m.name:<{width}}  {algo}{str(m.rank or '?'):>4} {alpha} {norm}  {ups}  "
                           f"{m.status}{' - ' + m.note if m.note else ''}")
        out += ["summary: " + s for s in self.summary]
        out.append(f"verdict: {'DAMAGED' if self.damaged else 'OK'}")
        return out


def _tensor_check(part: str, t: torch.Tensor) -> TensorCheck:
    x = t.detach()
    finite = torch.isfinite(x) if x.is_floating_point() else torch.ones_like(x, dtype=torch.bool)
    a = x.float().abs()
    af = a[finite]
    n = max(1, x.numel())
    zeros = int((x == 0).sum())
    tiny = int(((a > 0) & (a < FP16_TINY)).sum()) if x.dtype == torch.float16 else 0
    return TensorCheck(part, tuple(x.shape), str(x.dtype).replace("torch.", ""),
                       float(af.mean()) if af.numel() else float("nan"),
                       float(af.min()) if af.numel() else float("nan"),
                       x.numel() > 0 and zeros == x.numel(), zeros / n, tiny / n,
                       int(torch.isnan(x).sum()) if x.is_floating_point() else 0,
                       int(torch.isinf(x).sum()) if x.is_floating_point() else 0)


def _clip_skip(md: Dict[str, str]) -> int:
    try:
        return max(1, int(float(md.get("ss_clip_skip", "1"))))
    except ValueError:
        return 1


_TE_LAYER = re.compile(r"^(lora_te[12]?)_text_model_encoder_layers_(\d+)_")


def expected_unused(names: List[str], kind: Optional[str], clip_skip: int) -> Set[str]:
    """Text-encoder modules whose layer output the model never uses (so they cannot train)."""
    layers: Dict[str, int] = {}
    for n in names:
        m = _TE_LAYER.match(n)
        if m:
            layers[m[1]] = max(layers.get(m[1], -1), int(m[2]))
    skipped: Dict[str, int] = {}
    for prefix, last in layers.items():
        if kind == "sdxl":
            skip = 2 if prefix == "lora_te1" else 1  # te1: penultimate hidden state; te2's last layer feeds the pooled output
        elif kind == "sd2":
            skip = max(2, clip_skip)  # OpenCLIP "penultimate"
        else:
            skip = clip_skip
        skipped[prefix] = last + 1 - (skip - 1)
    out = set()
    for n in names:
        m = _TE_LAYER.match(n)
        if m and int(m[2]) >= skipped[m[1]]:
            out.add(n)
    return out


def check_lora(path) -> CheckReport:
    f: LoRAFile = read_lora(path)
    clip_skip = _clip_skip(f.metadata)
    report = CheckReport(f.path, f.kind, str(f.dtype).replace("torch.", ""), clip_skip)
    names = list(f.modules)
    unused = expected_unused(names, f.kind, clip_skip)
    for name, parts in f.modules.items():
        algo = f.algos[name]
        tensors = [_tensor_check(p, t) for p, t in parts.items()]
        rank = algo.rank(parts) if algo and algo.rank else None
        alpha = float(parts["alpha"]) if "alpha" in parts and parts["alpha"].numel() == 1 else None
        m = ModuleCheck(name, algo.name if algo else "unknown", rank, alpha, None, tensors)
        if algo is not None and not m.nonfinite and not algo.needs_weight:
            with torch.no_grad():
                m.delta_norm = float(module_delta(parts, algo).norm())
                bias = algo.bias(parts) if algo.bias else None
                m.bias_norm = float(bias.norm()) if bias is not None else None
        if m.nonfinite:
            bad = [t.part for t in tensors if t.nan or t.inf]
            m.status, m.note = "nonfinite", f"NaN/Inf in {', '.join(bad)}"
        elif m.zero:
            zero_parts = [t.part for t in tensors if t.zero and t.part not in SIDE_PARTS]
            what = ", ".join(zero_parts) + " all zero" if zero_parts else "ΔW is zero"
            if alpha == 0 and rank:
                what = "alpha is 0 (the WebUI applies it with scale 0)"
            if name in unused:
                m.status, m.note = "zero-expected", f"{what}; this layer is unused at clip skip {clip_skip}"
            else:
                m.status, m.note = "zero", what
        elif algo is None:
            m.status = "unknown"
        if "dora_scale" in parts and parts["dora_scale"].dim() >= 2 and parts["dora_scale"].shape[0] != 1:
            m.note = (m.note + "; " if m.note else "") + "dora_scale is per output row (wd_on_output)"
        report.modules.append(m)
    _summarise(report, f, unused)
    return report


def _summarise(report: CheckReport, f: LoRAFile, unused: Set[str]) -> None:
    s = report.summary
    ms = report.modules
    n_unet, n_te = module_counts(m.name for m in ms)
    ranks = sorted({m.rank for m in ms if m.rank})
    types: Dict[str, int] = {}
    for m in ms:
        a = f.algos[m.name]
        label = (a.label or a.name) if a is not None else "unknown"
        types[label] = types.get(label, 0) + 1
    kinds = "; " + ", ".join(f"{n} {t}" for t, n in types.items()) if set(types) != {"LoRA / LoCon"} else ""
    s.append(f"{n_unet} UNet + {n_te} text-encoder modules{kinds}; rank {fmt_list([str(r) for r in ranks], 6) or '?'}; "
             f"clip skip {report.clip_skip} (from metadata)")
    weighted = [m.name for m in ms if f.algos[m.name] is not None and f.algos[m.name].needs_weight]
    if weighted:
        s.append(f"note: {len(weighted)} modules (IA3 / OFT / DoRA) change their layer relative to the checkpoint's "
                 "weights, so their |dW| needs the checkpoint; their tensors were checked for zero/NaN/Inf")
    wd_out = [m.name for m in ms if "wd_on_output" in m.note]
    if wd_out:
        s.append(f"warning: {len(wd_out)} DoRA modules store their magnitude per output row (trained with "
                 f"wd_on_output=True, {fmt_list(wd_out)}): the WebUI (v1.10) applies it per input column, so it "
                 "will not reproduce the training; train again with wd_on_output=False")
    damaged = False
    bad = [m.name for m in ms if m.status == "nonfinite"]
    if bad:
        damaged = True
        s.append(f"DAMAGED: {len(bad)} modules contain NaN/Inf ({fmt_list(bad)}). The training diverged or an fp16 "
                 "value overflowed; this file gives black or noise images. Use an earlier epoch, or train again "
                 "with a lower learning rate and bf16.")
    expected = [m.name for m in ms if m.status == "zero-expected"]
    if expected:
        layers = len({_TE_LAYER.match(n)[0] for n in expected})
        why = {"sd2": "SD2 reads its text encoder at the penultimate layer", "sdxl": "SDXL reads its first text "
               "encoder at the penultimate layer"}.get(report.kind, f"at clip skip {report.clip_skip}")
        s.append(f"expected: {len(expected)} text-encoder modules are zero ({fmt_list(expected)}): {why}, the model "
                 f"never uses the output of the last {'layer' if layers == 1 else f'{layers} layers'}, so "
                 f"{'it' if layers == 1 else 'they'} cannot train. Harmless.")
    zero = [m for m in ms if m.status == "zero"]
    fp16 = f.dtype == torch.float16
    ups = [m.smallest for m in ms if m.smallest is not None]
    tiny = sum(t.tiny_frac * _numel(t) for t in ups) / max(1, sum(_numel(t) for t in ups))
    partly = [m.name for m in ms if m.status == "ok" and any(0.5 <= t.zero_frac < 1 for t in m.tensors if t.part != "alpha")]
    if zero:
        damaged = True
        names = [m.name for m in zero]
        te_only = all(is_text_encoder(n) for n in names)
        if fp16:
            cause = ("this fp16 file most likely lost them to fp16 underflow (values too small for fp16 rounded to "
                     "0). Save with save_precision bf16 or float (and train in bf16), or raise network_alpha")
        elif te_only and len(names) >= n_te - len(unused) and n_te:
            cause = "the text encoder did not train (text_encoder_lr 0, or stopped before the first step)"
        else:
            cause = "these parts never trained (learning rate 0 for them?) or their weights were lost"
        s.append(f"DAMAGED: {len(zero)} modules are zero where training should have changed them "
                 f"({fmt_list(names)}): {cause}.")
    if partly:
        s.append(f"warning: {len(partly)} modules have tensors that are mostly exact zeros ({fmt_list(partly)})"
                 + (": fp16 underflow is eating them; save with bf16 or float" if fp16 else ""))
    if fp16 and tiny > 0.1:
        s.append(f"note: {100 * tiny:.0f}% of the lora_up values (or the smallest trained tensor's) are fp16 "
                 "subnormals (below 6.1e-5, fewer digits kept): the weights are close to fp16's lower limit; bf16 "
                 "or float would keep them exactly.")
    unknown = [m.name for m in ms if m.status == "unknown"]
    if unknown:
        s.append(f"note: {len(unknown)} modules are of a type this checker cannot rebuild ({fmt_list(unknown)}); "
                 "only their raw tensors were checked.")
    stored = f.metadata.get("sshs_model_hash")
    if stored:
        actual = addnet_hash_file(f.path)
        if stored != actual:
            s.append(f"warning: the metadata's sshs_model_hash ({stored[:12]}) is not this file's ({actual[:12]}): the "
                     "WebUI trusts the stored one, so its Lora hashes in image infotexts will be wrong.")
    if not damaged:
        s.append("no damage found" + (f" (the {len(expected)} zero modules above are expected)" if expected else ""))
    report.verdict = "damaged" if damaged else "ok"


def _numel(t: TensorCheck) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n

