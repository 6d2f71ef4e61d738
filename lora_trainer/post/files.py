"""LoRA files as the post tools see them: modules grouped by name, the algorithm of each, the model
kind; clear messages for files that are not LoRAs; the rules for output names and metadata."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import UserError
from ..io.lora_file import load_lora
from ..io.metadata import ARCHITECTURES, BASE_VERSIONS
from .lora_math import Algorithm, Parts, detect_algorithm

KINDS = ("sd1", "sd2", "sdxl")
KIND_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
PRECISION_OF = {torch.float32: "float", torch.float16: "fp16", torch.bfloat16: "bf16"}
NOTE_KEY = "lora_trainer_post"  # JSON list: one entry per post tool that produced or changed the file

_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


@dataclass
class LoRAFile:
    path: Path
    metadata: Dict[str, str]
    modules: Dict[str, Parts]
    algos: Dict[str, Optional[Algorithm]]
    dtype: torch.dtype
    kind: Optional[str]

    @property
    def name(self) -> str:
        return self.path.name

    def precision(self) -> str:
        return PRECISION_OF.get(self.dtype, "float")


def _group(tensors: Dict[str, torch.Tensor]) -> Dict[str, Parts]:
    modules: Dict[str, Parts] = {}
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = t
    return modules


def _not_a_lora(path: Path, keys: Sequence[str]) -> Optional[str]:
    if not keys:
        return f"{path.name} holds no tensors: it is not a LoRA."
    if any(k.startswith(_CHECKPOINT_PREFIXES) or k in ("alphas_cumprod", "betas") for k in keys):
        return (f"{path.name} is a Stable Diffusion checkpoint (model.diffusion_model.* / alphas_cumprod keys), not a "
                "LoRA. Pass it as --model (merge, extract) instead.")
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return f"{path.name} is a textual-inversion embedding, not a LoRA."
    if any(k.startswith(("encoder.", "decoder.", "quant_conv.")) for k in keys):
        return f"{path.name} looks like a VAE (encoder./decoder. keys), not a LoRA."
    if not any(n.startswith(("lora_", "lycoris_", "oft_")) for n in {k.partition('.')[0] for k in keys}):
        return (f"{path.name} is not a LoRA: none of its {len(keys)} keys is named like one "
                f"(lora_unet_* / lora_te_*), e.g. {sorted(keys)[0]}.")
    return None


def detect_kind(metadata: Dict[str, str], names: Iterable[str]) -> Optional[str]:
    """sd1 / sd2 / sdxl by the key names (te1/te2 -> SDXL), then the WebUI's metadata rule
    (``ss_base_model_version`` sdxl_* -> SDXL, ``ss_v2 == "True"`` -> SD2, other metadata -> SD1).
    None when nothing tells."""
    names = list(names)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    version = str(metadata.get("ss_base_model_version", ""))
    arch = str(metadata.get("modelspec.architecture", ""))
    if version.startswith("sdxl_") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if metadata.get("ss_v2") == "False" or version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def read_lora(path) -> LoRAFile:
    """Load a LoRA file, or raise UserError saying what the file is instead (checkpoint, embedding,
    not safetensors, truncated ...)."""
    path = Path(path)
    tensors, metadata = load_lora(path)
    problem = _not_a_lora(path, list(tensors))
    if problem:
        raise UserError(problem)
    modules = _group(tensors)
    algos = {n: detect_algorithm(p) for n, p in modules.items()}
    floats = [t for t in tensors.values() if t.is_floating_point() and t.dim() > 0]
    dtype = max(floats, key=lambda t: t.numel()).dtype if floats else torch.float32
    return LoRAFile(path, dict(metadata or {}), modules, algos, dtype, detect_kind(metadata or {}, modules))


def is_text_encoder(name: str) -> bool:
    return name.startswith(("lora_te_", "lora_te1_", "lora_te2_"))


# ------------------------------------------------------------------ outputs
def check_output(save_to, inputs: Sequence, *, overwrite: bool = False, what: str = "LoRA") -> Path:
    """The output path, or UserError. Never an input; an existing file only with ``overwrite``."""
    if not save_to:
        raise UserError("save_to is empty: name the file to write (e.g. out.safetensors).")
    p = Path(save_to).expanduser()
    if p.suffix == "":
        p = p.with_name(p.name + ".safetensors")
    if p.suffix.lower() != ".safetensors":
        raise UserError(f"save_to {p.name}: the {what} is written as .safetensors only; end the name with .safetensors.")
    resolved = p.resolve()
    for i in inputs:
        if i and Path(i).expanduser().resolve() == resolved:
            raise UserError(f"save_to {p} is one of the inputs: choose a new name; the input was left as it is.")
    if p.is_dir():
        raise UserError(f"save_to {p} is a folder: give a file name ending in .safetensors.")
    if p.exists() and not overwrite:
        raise UserError(f"{p} already exists: choose another name or delete it first. Nothing was written.")
    return p


def kind_metadata(kind: str, v_pred: bool = False) -> Dict[str, str]:
    version = BASE_VERSIONS[kind] + ("_v" if v_pred and kind != "sdxl" else "")
    arch = ARCHITECTURES[kind] if not (kind == "sd2" and v_pred) else "stable-diffusion-v2-768-v"
    return {"ss_v2": str(kind == "sd2"), "ss_base_model_version": version,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora"}


def output_metadata(base: Dict[str, str], out: Path, note: Dict, comment: str) -> Dict[str, str]:
    """Metadata for a written LoRA: the base's, minus stale hashes, with this file's own name (the WebUI
    drops an alias two files share), the comment in front of the old one, and a note appended to
    ``lora_trainer_post``."""
    md = {k: str(v) for k, v in base.items() if not k.startswith("sshs_")}
    md["ss_output_name"] = out.stem
    md["modelspec.title"] = out.stem
    old = md.get("ss_training_comment", "")
    md["ss_training_comment"] = comment + (f"; {old}" if old and old != "None" else "")
    try:
        notes = json.loads(md.get(NOTE_KEY, "[]"))
        notes = notes if isinstance(notes, list) else [notes]
    except ValueError:
        notes = []
    notes.append(dict(note, date=time.strftime("%Y-%m-%dT%H:%M:%S")))
    md[NOTE_KEY] = json.dumps(notes)
    return md


def parse_weighted(spec: str) -> Tuple[str, float]:
    """``A.safetensors:0.8`` -> (path, 0.8); a path without a ratio gets 1.0 (``C:\\x.safetensors`` stays whole)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


LoraSpec = Union[str, "os.PathLike", Tuple[str, float]]


def parse_specs(loras: Sequence[LoraSpec]) -> List[Tuple[str, float]]:
    """``["A.safetensors:0.8", Path("B.safetensors"), ("C.safetensors", 0.5)]`` -> [(path, ratio), ...]
    (a string may carry ``:ratio``; a Path means ratio 1); at least one."""
    out = []
    for s in loras or []:
        if isinstance(s, str):
            out.append(parse_weighted(s))
        elif isinstance(s, os.PathLike):
            out.append((os.fspath(s), 1.0))
        else:
            out.append((os.fspath(s[0]), float(s[1])))
    if not out:
        raise UserError("No LoRA given: list one or more as --loras A.safetensors:0.8 B.safetensors:0.5.")
    return out


def check_kinds(files: Sequence[LoRAFile], target: Optional[str] = None, target_name: str = "") -> Optional[str]:
    """The common model kind of the files (and the target's), or UserError naming the odd one."""
    kinds = [(f.name, f.kind) for f in files if f.kind]
    if target:
        for name, kind in kinds:
            if kind != target:
                raise UserError(f"{name} is a LoRA for {KIND_NAMES[kind]} models, but {target_name} is an "
                                f"{KIND_NAMES[target]} checkpoint. Nothing was written.")
        return target
    distinct = sorted({k for _, k in kinds})
    if len(distinct) > 1:
        desc = ", ".join(f"{n} ({KIND_NAMES[k]})" for n, k in kinds)
        raise UserError(f"These LoRAs are for different model kinds and cannot be combined: {desc}.")
    return distinct[0] if distinct else None


def finite_or_raise(f: LoRAFile) -> None:
    for name, parts in f.modules.items():
        for part, t in parts.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"{f.name} is damaged: {name}.{part} contains NaN/Inf (run `check` on it). "
                                "Nothing was written.")


def module_counts(names: Iterable[str]) -> Tuple[int, int]:
    names = list(names)
    te = sum(is_text_encoder(n) for n in names)
    return len(names) - te, te


def fmt_list(items: List[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
