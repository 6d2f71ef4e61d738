"""Combine: several LoRAs with ratios into one LoRA.

By default the ranks are concatenated: a module's new ``lora_up`` / ``lora_down`` stack every
file's factors (ratio and scale folded in, split evenly between up and down), alpha = total rank,
so ``<lora:combined:1>`` is exactly ``<lora:A:ra> <lora:B:rb>``. With ``new_rank`` each module's sum
is re-factored by SVD to that rank (the best approximation at that rank; ``new_conv_rank`` for 3×3
convs). Modules are matched by the layer they land on, so a file with diffusers-style names and one
with LDM-style names combine correctly.
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
from .lora_math import SVD, lowrank_svd, retained, select_rank, to_lora

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
        f.require_supported("combine", need_factors=True)
        finite_or_raise(f)
    kind = check_kinds(files)
    groups: Dict[str, List[Tuple[int, str]]] = {}
    for i, f in enumerate(files):
        for name in f.modules:
            groups.setdefault(canonical_layer(name, kind), []).append((i, name))
    precision = save_precision or files[0].precision()
    report = CombineReport([(f.name, r) for f, (_, r) in zip(files, specs)], out, kind, new_rank, precision=precision)
    tensors: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, members in enumerate(groups.values()):
            name, up, down, mod = _combine_module(files, specs, members, new_rank, new_conv_rank, device)
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
            report.modules.append(mod)
            if progress:
                progress(n + 1, len(groups), name)
    skips = {f.metadata.get("ss_clip_skip") for f in files if f.metadata.get("ss_clip_skip")}
    if len(skips) > 1:
        report.notes.append(f"the files were trained with different clip skips ({', '.join(sorted(skips))}); "
                            f"the metadata keeps {files[0].metadata.get('ss_clip_skip')}")
    save_lora(out, tensors, _metadata(files, specs, out, kind, new_rank, new_conv_rank, report, precision), precision)
    report.seconds = time.time() - t0
    log.info("combined %d LoRAs -> %s", len(files), out)
    return report


def _combine_module(files: List[LoRAFile], specs, members, new_rank, new_conv_rank, device):
    first_file, first_name = files[members[0][0]], members[0][1]
    algo = first_file.algos[first_name]
    shape = tuple(algo.shape(first_file.modules[first_name]))
    a_parts, b_parts = [], []
    for i, name in members:
        parts, algo = files[i].modules[name], files[i].algos[name]
        a, b = algo.factors(parts)
        if a.shape[0] != shape[0] or b.shape[1] != _numel(shape[1:]):
            raise UserError(f"{first_name} has shape {shape} in {first_file.name} but "
                            f"{tuple(algo.shape(parts))} in {files[i].name}: these LoRAs are for different models.")
        c = specs[i][1]
        s = abs(c) ** 0.5
        a_parts.append(a * (s if c >= 0 else -s))
        b_parts.append(b * s)
    a, b = torch.cat(a_parts, 1).to(device), torch.cat(b_parts, 0).to(device)
    conv3 = len(shape) == 4 and shape[2:] != (1, 1)
    cap = (new_conv_rank if conv3 and new_conv_rank else new_rank)
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
