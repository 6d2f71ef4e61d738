"""Combine: several LoRAs with ratios into one LoRA.

By default the ranks are concatenated: a module's new ``lora_up`` / ``lora_down`` stack every
file's factors (ratio and scale folded in, split evenly between up and down), alpha = total rank,
so ``<lora:combined:1>`` is exactly ``<lora:A:ra> <lora:B:rb>``. With ``new_rank`` each module's sum
is re-factored by SVD to that rank (the best approximation at that rank; ``new_conv_rank`` for 3×3
convs). Modules are matched by the layer they land on, so a file with diffusers-style names and one
with LDM-style names combine correctly.

LyCORIS inputs: LoCon with a CP/Tucker core still has up/down factors and concatenates exactly. LoHa,
LoKr and full/diff modules do not (ΔW is a Hadamard or Kronecker product, or dense), so with any of
them ``new_rank`` is required: each layer's Σ ratio·ΔW (ΔW by the WebUI's rule) is re-factored by SVD
into a plain LoRA; without it combine refuses. Norm modules (``w_norm``/``b_norm``) add up exactly
and stay norm modules; ``full`` bias changes (``diff_b``) cannot be held by a LoRA and are left out
(the report says how many). IA3, OFT and DoRA depend on the checkpoint's weights: refused.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from ..io.lora_file import SAVE_DTYPES, save_lora
from ..networks.naming import webui_convert_name
from .files import (KIND_NAMES, LoraSpec, LoRAFile, check_kinds, check_output, finite_or_raise, kind_metadata,
                    output_metadata, parse_specs, read_lora)
from .lora_math import (SVD, full_svd, layer_shape_of, lowrank_svd, module_delta, require_known, retained, select_rank,
                        to_lora)

log = logging.getLogger(__name__)


@dataclass
class ModuleCombine:
    name: str
    sources: int
    rank: int
    fro: float = 1.0


@dataclass
class CombineReport:
    inputs: List[Tuple[str, float]]
    output: Path
    kind: Optional[str]
    new_rank: Optional[int]
    modules: List[ModuleCombine] = field(default_factory=list)
    precision: str = ""
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self, per_module: bool = False) -> List[str]:
        how = f"re-factored to rank {self.new_rank}" if self.new_rank else "ranks concatenated (exact)"
        out = [f"combine {' + '.join(f'{n} x {r:g}' for n, r in self.inputs)} -> {self.output} ({how})"]
        if per_module:
            width = max((len(m.name) for m in self.modules), default=10)
            for m in self.modules:
                out.append(f"  {m.name:<{width}}  from {m.sources} files  rank {m.rank:<4} {100 * m.fro:6.2f}% kept")
        ranks = [m.rank for m in self.modules]
        if ranks:
            out.append(f"summary: {len(self.modules)} modules ({sum(m.sources > 1 for m in self.modules)} in more than "
                       f"one file); rank {min(ranks)}-{max(ranks)}; "
                       f"Frobenius norm kept: min {100 * min(m.fro for m in self.modules):.1f}%; "
                       f"{KIND_NAMES.get(self.kind, 'unknown kind')}; {self.precision}; {self.seconds:.1f}s")
        out += ["note: " + n for n in self.notes]
        return out


def canonical_layer(name: str, kind: Optional[str]) -> str:
    """The WebUI layer a module name lands on, without a model: diffusers- and LDM-style names of
    the same layer give the same string."""
    k = webui_convert_name(name, kind == "sd2")
    if k != name:
        return k
    if name.startswith("lora_unet_"):
        return "diffusion_model_" + name[len("lora_unet_"):]
    if name.startswith("lora_te1_text_model_"):
        return ("0_" if kind == "sdxl" else "") + "transformer_text_model_" + name[len("lora_te1_text_model_"):]
    return name


def combine_loras(loras: Sequence[LoraSpec], save_to, *, new_rank: Optional[int] = None,
                  new_conv_rank: Optional[int] = None, save_precision: Optional[str] = None, device: str = "cpu",
                  overwrite: bool = False, progress: Optional[Callable[[int, int, str], None]] = None) -> CombineReport:
    t0 = time.time()
    specs = parse_specs(loras)
    for label, v in (("new_rank", new_rank), ("new_conv_rank", new_conv_rank)):
        if v is not None and int(v) < 1:
            raise UserError(f"{label} {v} must be at least 1.")
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise UserError(f"save_precision {save_precision!r} is unknown: use float, fp16 or bf16.")
    out = check_output(save_to, [p for p, _ in specs], overwrite=overwrite)
    files = [read_lora(p) for p, _ in specs]
    for f in files:
        require_known(f, "combine", without_base=True)
        finite_or_raise(f)
    kind = check_kinds(files)
    dense = [(f, a) for f in files for a in f.algos.values() if a.factors is None and a.name != "norm"]
    if dense and not new_rank:
        f, a = dense[0]
        raise UserError(f"{f.name} holds {a.label or a.name} modules: their ΔW is not an up @ down product, so their "
                        "ranks cannot be stacked into a plain LoRA exactly. Give new_rank (e.g. --new_rank 32): each "
                        "layer's weighted sum is then re-factored by SVD to that rank, as a plain LoRA. "
                        "Nothing was written.")
    groups: Dict[str, List[Tuple[int, str]]] = {}
    for i, f in enumerate(files):
        for name in f.modules:
            groups.setdefault(canonical_layer(name, kind), []).append((i, name))
    precision = save_precision or files[0].precision()
    report = CombineReport([(f.name, r) for f, (_, r) in zip(files, specs)], out, kind, new_rank, precision=precision)
    tensors: Dict[str, torch.Tensor] = {}
    norms, no_bias = 0, set()
    with torch.no_grad():
        for n, members in enumerate(groups.values()):
            algos = [files[i].algos[name] for i, name in members]
            if any(a.name == "norm" for a in algos):
                name = _combine_norm(files, specs, members, tensors)
                norms += 1
            else:
                name, up, down, mod = _combine_module(files, specs, members, new_rank, new_conv_rank, device, kind)
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
                report.modules.append(mod)
                for (i, m), a in zip(members, algos):
                    b = a.bias(files[i].modules[m]) if a.bias else None
                    if b is not None and bool(b.any()) and specs[i][1] != 0:
                        no_bias.add(name)
            if progress:
                progress(n + 1, len(groups), name)
    if dense:
        labels = sorted({a.label or a.name for _, a in dense})
        report.notes.append(f"{', '.join(labels)} modules were re-factored by SVD of their ΔW: the result is a plain "
                            "LoRA (ss_network_module networks.lora)")
    if norms:
        report.notes.append(f"{norms} LyCORIS norm modules (w_norm, b_norm) were added up with their ratios and kept "
                            "as norm modules (the WebUI applies them from any file)")
    if no_bias:
        report.notes.append(f"{len(no_bias)} layers also had a bias change (LyCORIS full diff_b); a plain LoRA holds "
                            "no bias, so those changes are left out. merge keeps them")
    skips = {f.metadata.get("ss_clip_skip") for f in files if f.metadata.get("ss_clip_skip")}
    if len(skips) > 1:
        report.notes.append(f"the files were trained with different clip skips ({', '.join(sorted(skips))}); "
                            f"the metadata keeps {files[0].metadata.get('ss_clip_skip')}")
    save_lora(out, tensors, _metadata(files, specs, out, kind, new_rank, new_conv_rank, report, precision), precision)
    report.seconds = time.time() - t0
    log.info("combined %d LoRAs -> %s", len(files), out)
    return report


def _combine_norm(files: List[LoRAFile], specs, members, tensors) -> str:
    first_file, first_name = files[members[0][0]], members[0][1]
    total: Dict[str, torch.Tensor] = {}
    for i, name in members:
        if files[i].algos[name].name != "norm":
            raise UserError(f"{first_name} is a norm module in {first_file.name} but not in {files[i].name}: "
                            "these files are for different models.")
        for part in ("w_norm", "b_norm"):
            t = files[i].modules[name][part].float() * specs[i][1]
            if part in total and total[part].shape != t.shape:
                raise UserError(f"{first_name} has shape {tuple(total[part].shape)} in {first_file.name} but "
                                f"{tuple(t.shape)} in {files[i].name}: these files are for different models.")
            total[part] = total[part] + t if part in total else t
    for part, t in total.items():
        tensors[f"{first_name}.{part}"] = t
    return first_name


def _combine_module(files: List[LoRAFile], specs, members, new_rank, new_conv_rank, device, kind=None):
    first_file, first_name = files[members[0][0]], members[0][1]
    shapes = [tuple(files[i].algos[name].shape(files[i].modules[name])) for i, name in members]
    # the layer's shape: a member's 4-D one, else known from the name (LyCORIS saves some convs flattened)
    shape = next((s for s in shapes if len(s) == 4), None) or layer_shape_of(first_name, shapes[0], kind)
    for (i, name), s in zip(members, shapes):
        if s[0] != shape[0] or _numel(s) != _numel(shape):
            raise UserError(f"{first_name} has shape {shapes[0]} in {first_file.name} but "
                            f"{s} in {files[i].name}: these LoRAs are for different models.")
    conv3 = len(shape) == 4 and shape[2:] != (1, 1)
    cap = (new_conv_rank if conv3 and new_conv_rank else new_rank)
    if any(files[i].algos[name].factors is None for i, name in members):
        # LoHa / LoKr / full: form Σ ratio·ΔW and factor it (cap is set: checked before anything ran)
        w = torch.zeros(shape, dtype=torch.float32, device=device)
        for i, name in members:
            w += module_delta(files[i].modules[name], files[i].algos[name]).to(device).reshape(shape) * specs[i][1]
        svd = full_svd(w, device)
        r = select_rank(svd.S, cap)
        up, down = to_lora(svd, r, split="sqrt")
        return first_name, up, down, ModuleCombine(first_name, len(members), r, retained(svd.S, r).fro)
    a_parts, b_parts = [], []
    for i, name in members:
        parts, algo = files[i].modules[name], files[i].algos[name]
        a, b = algo.factors(parts)
        c = specs[i][1]
        s = abs(c) ** 0.5
        a_parts.append(a * (s if c >= 0 else -s))
        b_parts.append(b * s)
    a, b = torch.cat(a_parts, 1).to(device), torch.cat(b_parts, 0).to(device)
    if cap:
        u, s, vh = lowrank_svd(a, b)
        r = select_rank(s, cap)
        up, down = to_lora(SVD(u, s, vh, shape), r, split="sqrt")
        return first_name, up, down, ModuleCombine(first_name, len(members), r, retained(s, r).fro)
    rank = a.shape[1]
    if len(shape) == 4:
        return (first_name, a.reshape(shape[0], rank, 1, 1).cpu(), b.reshape(rank, *shape[1:]).cpu(),
                ModuleCombine(first_name, len(members), rank))
    return first_name, a.cpu(), b.cpu(), ModuleCombine(first_name, len(members), rank)


def _metadata(files: List[LoRAFile], specs, out: Path, kind, new_rank, new_conv_rank, report: CombineReport,
              precision) -> Dict[str, str]:
    md = dict(files[0].metadata)
    if kind:
        for k, v in kind_metadata(kind).items():
            if k.startswith("modelspec.") or (k == "ss_base_model_version" and md.get(k, "").startswith(v)):
                md.setdefault(k, v)  # keep the file's own (a more precise sd_v2_v, its architecture)
            else:
                md[k] = v
    ranks = {m.rank for m in report.modules}
    md["ss_network_module"] = "networks.lora"
    md["ss_network_dim"] = md["ss_network_alpha"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    md.pop("ss_network_args", None)
    tags: Dict[str, Dict[str, int]] = {}
    for f in files:
        try:
            for d, counts in json.loads(f.metadata.get("ss_tag_frequency", "{}")).items():
                for tag, c in counts.items():
                    tags.setdefault(d, {})[tag] = tags.get(d, {}).get(tag, 0) + int(c)
        except (ValueError, AttributeError, TypeError):
            pass
    if tags:
        md["ss_tag_frequency"] = json.dumps(tags)
    comment = "combined " + ", ".join(f"{f.name} x {r:g}" for f, (_, r) in zip(files, specs)) + (
        f", re-factored to rank {new_rank}" if new_rank else ", ranks concatenated")
    note = {"tool": "combine", "inputs": [{"name": f.name, "ratio": r, "sshs_model_hash": f.metadata.get("sshs_model_hash")}
                                          for f, (_, r) in zip(files, specs)],
            "new_rank": new_rank, "new_conv_rank": new_conv_rank, "save_precision": precision}
    return output_metadata(md, out, note, comment)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
