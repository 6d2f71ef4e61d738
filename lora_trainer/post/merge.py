"""Merge: bake one or more LoRA / LyCORIS files into a checkpoint, ``W' = W + Σ ratio · ΔW``, into a new file.

Modules bind to checkpoint tensors by the WebUI's own resolution rules (so what is merged is what
``<lora:x:ratio>`` would change), ΔW comes from the per-algorithm registry in
:mod:`lora_trainer.post.lora_math` (LoRA/LoCon, LoHa, LoKr, IA3, full/diff, OFT/BOFT, norm, DoRA),
and OpenCLIP's fused attention gets its q/k/v rows. Bias changes (LyCORIS full ``diff_b``, norm
``b_norm``) go into the layer's bias, times the ratio. IA3, OFT and DoRA change a layer relative to
its weight; as in the WebUI, which applies the files of a prompt one after another, each sees the
weight as the files before it left it. Sums are formed in float32 and cast back to each tensor's
dtype once. The source and every existing file are left alone; the new file's metadata records what
was merged (``sd_merge_recipe``, as the WebUI's checkpoint merger writes it).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from ..io.lora_file import SAVE_DTYPES
from ..networks.naming import resolve_key
from .checkpoint_keys import Binding, Checkpoint, bind_modules, layer_map, save_new_file
from .files import (KIND_NAMES, LoraSpec, check_kinds, check_output, finite_or_raise, fmt_list, module_counts,
                    parse_specs, read_lora)
from .lora_math import module_delta, require_known

log = logging.getLogger(__name__)

@dataclass
class MergedLoRA:
    name: str
    ratio: float
    unet_modules: int
    te_modules: int
    dropped: List[str]
    hash: str
    types: Dict[str, int] = field(default_factory=dict)  # network type label -> modules


@dataclass
class MergeReport:
    model: Path
    output: Path
    kind: str
    loras: List[MergedLoRA] = field(default_factory=list)
    changed_tensors: int = 0
    precision: str = "as the checkpoint"
    yaml: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> List[str]:
        out = [f"merge into {self.model.name} ({KIND_NAMES[self.kind]}) -> {self.output}"]
        for m in self.loras:
            types = ", ".join(f"{n} {t}" for t, n in m.types.items()) if len(m.types) > 1 or (
                m.types and "LoRA / LoCon" not in m.types) else ""
            out.append(f"  {m.name} x {m.ratio:g}: {m.unet_modules} UNet + {m.te_modules} text-encoder modules"
                       + (f" ({types})" if types else ""))
            if m.dropped:
                out.append(f"    skipped {len(m.dropped)} OpenCLIP attention parts without all of q/k/v/out "
                           f"(the WebUI skips them too): {fmt_list(m.dropped)}")
        out.append(f"summary: {self.changed_tensors} checkpoint tensors changed; precision {self.precision}; "
                   f"{self.seconds:.1f}s")
        if self.yaml:
            out.append(f"summary: copied the model config to {self.yaml.name}")
        out += ["note: " + n for n in self.notes]
        return out


def _bind_norms(names: List[str], shapes, kind: str) -> Tuple[Dict[str, Binding], List[str]]:
    """LyCORIS norm modules (``w_norm``/``b_norm``) land on GroupNorm/LayerNorm weights, which are 1-D:
    the same WebUI naming as for Linear/Conv, on the checkpoint's 1-D ``.weight`` tensors."""
    one_d = {k: (s[0], 1) for k, s in shapes.items() if len(s) == 1 and k.endswith(".weight")}
    layers = layer_map(one_d, kind)  # layer_map looks at 2-D+ tensors only: give the 1-D ones a unit column
    bindings, unmatched = {}, []
    for n in names:
        layer = resolve_key(n, layers, kind == "sd2")
        if layer is None:
            unmatched.append(n)
        else:
            bindings[n] = Binding(n, layers[layer], None, layer)
    return bindings, unmatched


def plan_merge(files, ckpt: Checkpoint) -> List[Tuple[Dict[str, Binding], List[str]]]:
    """Bind every module of every file, or UserError (unmatched names, shapes that do not fit)."""
    plans = []
    for f in files:
        norms = [n for n, a in f.algos.items() if a.name == "norm"]
        bindings, unmatched, dropped = bind_modules([n for n in f.modules if n not in norms], ckpt.shapes, ckpt.kind)
        norm_bindings, norm_unmatched = _bind_norms(norms, ckpt.shapes, ckpt.kind)
        bindings.update(norm_bindings)
        unmatched += norm_unmatched
        if unmatched:
            raise UserError(f"{f.name}: {len(unmatched)} of its {len(f.modules)} modules match no layer of "
                            f"{ckpt.name} ({fmt_list(unmatched)}). Is it a LoRA for another model kind? "
                            "Nothing was written.")
        for name, b in bindings.items():
            algo = f.algos[name]
            if algo.shape:
                shape = algo.shape(f.modules[name])
            elif not algo.needs_weight:
                shape = tuple(algo.delta(f.modules[name]).shape)
            else:
                continue  # IA3 / OFT: checked when ΔW is formed against the weight
            target = b.target_shape(ckpt.shapes)
            if _numel(shape) != _numel(target):
                raise UserError(f"{f.name}: module {name} has shape {tuple(shape)} but {ckpt.name}'s {b.key} is "
                                f"{tuple(target)}: the LoRA was trained for a different model "
                                f"(this is an {KIND_NAMES[ckpt.kind]} checkpoint). Nothing was written.")
        plans.append((bindings, dropped))
    return plans


def merge_lora_into_checkpoint(model, loras: Sequence[LoraSpec], save_to, *, save_precision: Optional[str] = None,
                               device: str = "cpu", progress: Optional[Callable[[int, int, str], None]] = None
                               ) -> MergeReport:
    """Write ``save_to``: ``model`` with each LoRA (path, ratio) merged in. Never overwrites a file."""
    t0 = time.time()
    specs = parse_specs(loras)
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise UserError(f"save_precision {save_precision!r} is unknown: use float, fp16 or bf16.")
    out = check_output(save_to, [model] + [p for p, _ in specs], overwrite=False, what="checkpoint")
    ckpt = Checkpoint(model)
    files = [read_lora(p) for p, _ in specs]
    for f in files:
        require_known(f, "merge")
        finite_or_raise(f)
    check_kinds(files, ckpt.kind, ckpt.name)
    plans = plan_merge(files, ckpt)
    report = MergeReport(ckpt.path, out, ckpt.kind, precision=save_precision or "as the checkpoint")
    by_key: Dict[str, List[Tuple[float, str, int, Binding]]] = {}
    by_bias: Dict[str, List[Tuple[float, str, int, Binding]]] = {}
    no_bias: List[str] = []
    for i, ((_, ratio), f, (bindings, dropped)) in enumerate(zip(specs, files, plans)):
        unet, te = module_counts(bindings)
        types: Dict[str, int] = {}
        for name in bindings:
            label = f.algos[name].label or f.algos[name].name
            types[label] = types.get(label, 0) + 1
        report.loras.append(MergedLoRA(f.name, ratio, unet, te, dropped, f.metadata.get("sshs_model_hash", ""), types))
        if ratio == 0:
            report.notes.append(f"{f.name} has ratio 0: it changes nothing")
        for name, b in bindings.items():
            by_key.setdefault(b.key, []).append((ratio, name, i, b))
            algo = f.algos[name]
            if algo.bias is not None and algo.bias(f.modules[name]) is not None:
                bias_key = _bias_key(b.key)
                if bias_key in ckpt.shapes:
                    by_bias.setdefault(bias_key, []).append((ratio, name, i, b))
                else:
                    no_bias.append(f"{f.name}:{name}")
    if no_bias:
        report.notes.append(f"{len(no_bias)} bias changes were left out: their layers have no bias in the checkpoint "
                            f"({fmt_list(no_bias)})")
    cast = SAVE_DTYPES.get(save_precision) if save_precision else None
    tensors: Dict[str, torch.Tensor] = {}
    keys = ckpt.keys()
    with torch.no_grad():
        for n, key in enumerate(keys):
            t = ckpt.get(key)
            if key in by_key or key in by_bias:
                acc = t.to(device=device, dtype=torch.float32).clone()
                for ratio, name, i, b in by_key.get(key, []):
                    part = acc[b.rows[0]:b.rows[1]] if b.rows else acc
                    d = _delta(files[i], name, part, ckpt.name, key) * ratio
                    part += d.to(device).reshape(part.shape)
                for ratio, name, i, b in by_bias.get(key, []):
                    part = acc[b.rows[0]:b.rows[1]] if b.rows else acc
                    d = files[i].algos[name].bias(files[i].modules[name])
                    if d.numel() != part.numel():
                        raise UserError(f"{files[i].name}: module {name} changes a bias of {d.numel()} values but "
                                        f"{ckpt.name}'s {key} has {part.numel()}. Nothing was written.")
                    part += d.to(device).reshape(part.shape) * ratio
                t = acc.to(t.dtype).cpu()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            tensors[key] = t.contiguous()
            if progress and (n % 64 == 0 or n == len(keys) - 1):
                progress(n + 1, len(keys), key)
    report.changed_tensors = len(set(by_key) | set(by_bias))
    bad = [k for k in set(by_key) | set(by_bias) if not torch.isfinite(tensors[k]).all()]
    if bad:
        raise UserError(f"Merging made {len(bad)} tensors non-finite (e.g. {bad[0]}): a ratio too large for "
                        f"{save_precision or 'the checkpoint precision'}? Nothing was written.")
    save_new_file(out, tensors, _metadata(ckpt, specs, files, save_precision))
    yaml = ckpt.path.with_suffix(".yaml")
    if yaml.is_file():
        target = out.with_suffix(".yaml")
        if target.exists():
            report.notes.append(f"{target.name} already exists and was left as it is")
        else:
            shutil.copyfile(yaml, target)
            report.yaml = target
    report.seconds = time.time() - t0
    log.info("merged %d LoRAs into %s -> %s", len(files), ckpt.path, out)
    return report


def _metadata(ckpt: Checkpoint, specs, files, save_precision) -> Dict[str, str]:
    md = {k: str(v) for k, v in (ckpt.metadata or {}).items()}
    md["format"] = "pt"
    recipe = {"type": "lora_trainer-lora-merge", "primary_model": ckpt.name,
              "primary_model_recipe": md.get("sd_merge_recipe"),
              "loras": [{"name": f.name, "ratio": ratio, "sshs_model_hash": f.metadata.get("sshs_model_hash"),
                         "ss_output_name": f.metadata.get("ss_output_name")}
                        for (_, ratio), f in zip(specs, files)],
              "save_precision": save_precision}
    md["sd_merge_recipe"] = json.dumps(recipe)
    return md


def _delta(f, name: str, weight: torch.Tensor, ckpt_name: str, key: str) -> torch.Tensor:
    """ΔW of one module; ``weight`` (the layer's current float32 weight) for the types that need it."""
    algo = f.algos[name]
    parts = f.modules[name]
    if algo.needs_weight:
        parts = {k: v.to(weight.device) for k, v in parts.items()}
    try:
        return module_delta(parts, algo, weight)
    except UserError as e:
        raise UserError(f"{f.name}: module {name}: {e} Nothing was written.") from None
    except (RuntimeError, ValueError) as e:  # IA3/OFT sizes are checked only against the weight
        raise UserError(f"{f.name}: module {name} ({algo.label or algo.name}) does not fit {ckpt_name}'s {key} "
                        f"{tuple(weight.shape)} ({e}): it was trained for a different model. "
                        "Nothing was written.") from None


def _bias_key(weight_key: str) -> str:
    if weight_key.endswith("in_proj_weight"):
        return weight_key[: -len("in_proj_weight")] + "in_proj_bias"
    return weight_key[: -len("weight")] + "bias"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
