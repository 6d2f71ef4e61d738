"""Checkpoints in the LDM key layout, read without building a model.

- which kind a checkpoint is (SD1: ``cond_stage_model.transformer.text_model.*``; SD2: OpenCLIP
  ``cond_stage_model.model.*`` with fused ``attn.in_proj_weight``; SDXL: ``conditioner.embedders.0/1.*``);
- the layer names the WebUI gives its weights (``model.diffusion_model.input_blocks.1.1.proj_in.weight``
  -> ``diffusion_model_input_blocks_1_1_proj_in``), so a LoRA module binds to a checkpoint tensor by
  the WebUI's own resolution rules (:func:`lora_trainer.networks.naming.resolve_key`);
- the layers a LoRA targets (for extract), named as the trainer names them.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import UserError
from ..io.atomic import create_temp_beside
from ..io.lora_file import read_header
from ..networks.naming import hf_clip_te_name, openclip_te_name, resolve_key, unet_kohya_name

UNET_ROOT = "model.diffusion_model."
TE_ROOTS = {"sd1": (("cond_stage_model.", "", "lora_te"),),
            "sd2": (("cond_stage_model.", "", "lora_te"),),
            "sdxl": (("conditioner.embedders.0.", "0_", "lora_te1"), ("conditioner.embedders.1.", "1_", "lora_te2"))}
# old SD1 checkpoints lack ``text_model.`` (the WebUI renames these on load)
_SD1_LEGACY = (("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
               ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
               ("cond_stage_model.transformer.final_layer_norm.",
                "cond_stage_model.transformer.text_model.final_layer_norm."))
_HF_TARGET = r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


def _normal(key: str) -> str:
    for old, new in _SD1_LEGACY:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_kind(keys: Iterable[str], name: str = "the checkpoint") -> str:
    keys = list(keys)
    if not any(k.startswith(UNET_ROOT) for k in keys):
        if any(k.startswith(("lora_unet", "lora_te")) for k in keys):
            raise UserError(f"{name} is a LoRA, not a checkpoint: pass it with --loras, and a checkpoint as --model.")
        raise UserError(f"{name} is not a Stable Diffusion checkpoint (no model.diffusion_model.* keys).")
    if any(k.startswith("conditioner.embedders.1.model.transformer.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UserError(f"{name} looks like an SDXL refiner (one OpenCLIP text encoder): not supported.")
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise UserError(f"{name} has a UNet but no text encoder this tool knows (SD1 CLIP, SD2 OpenCLIP, SDXL): "
                    "is it a full SD1/SD2/SDXL checkpoint?")


class Checkpoint:
    """A checkpoint file read lazily: shapes and dtypes from the header, tensors on demand.
    ``.safetensors`` is memory-mapped; ``.ckpt``/``.pt`` is loaded whole (weights only)."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        self._tensors: Optional[Dict[str, torch.Tensor]] = None
        self._handle = None
        if not self.path.is_file():
            raise UserError(f"{self.path} does not exist.")
        if self.path.suffix.lower() == ".safetensors":
            header, self.metadata = read_header(self.path)
            self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            self.dtypes = {k: v["dtype"] for k, v in header.items()}
        elif self.path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            try:
                obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
            except Exception as e:  # a pickle with code in it, or a broken/truncated file
                raise UserError(f"{self.path.name} could not be read as a checkpoint ({type(e).__name__}: {e}). "
                                "Convert it to .safetensors.") from None
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict):
                raise UserError(f"{self.path.name} holds no state dict: it is not a checkpoint.")
            self._tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            self.metadata = {}
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: str(v.dtype) for k, v in self._tensors.items()}
        else:
            raise UserError(f"{self.path.name}: a checkpoint must be .safetensors or .ckpt.")
        self.kind = checkpoint_kind(self.shapes, self.path.name)

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            from safetensors import safe_open
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def keys(self) -> List[str]:
        return list(self.shapes)


# ------------------------------------------------------------------ WebUI layer names and binding
def layer_map(shapes: Dict[str, Tuple[int, ...]], kind: str) -> Dict[str, str]:
    """WebUI layer name -> checkpoint key, for every Linear/Conv weight (and OpenCLIP's fused
    ``in_proj_weight``, whose layer is the ``nn.MultiheadAttention`` itself)."""
    roots = ((UNET_ROOT, "diffusion_model_"),) + tuple((r, p) for r, p, _ in TE_ROOTS[kind])
    out: Dict[str, str] = {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue
        k = _normal(key)
        if k.endswith(".in_proj_weight"):
            path = k[: -len(".in_proj_weight")]
        elif k.endswith(".weight"):
            path = k[: -len(".weight")]
        else:
            continue
        for root, pre in roots:
            if path.startswith(root):
                out[pre + path[len(root):].replace(".", "_")] = key
                break
    return out


@dataclass
class Binding:
    module: str                           # LoRA module name
    key: str                              # checkpoint tensor it changes
    rows: Optional[Tuple[int, int]] = None  # q/k/v rows of a fused in_proj_weight
    layer: str = ""                       # the WebUI's layer name

    def target_shape(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, ...]:
        shape = shapes[self.key]
        return (self.rows[1] - self.rows[0],) + tuple(shape[1:]) if self.rows else tuple(shape)


def bind_modules(names: Iterable[str], shapes: Dict[str, Tuple[int, ...]], kind: str
                 ) -> Tuple[Dict[str, Binding], List[str], List[str]]:
    """Where each LoRA module lands, by the WebUI's rules. Returns (bindings, unmatched names,
    dropped names): OpenCLIP attention parts are applied by the WebUI only when q, k, v and
    out_proj are all present; otherwise they are dropped, as here."""
    layers = layer_map(shapes, kind)
    bindings: Dict[str, Binding] = {}
    unmatched: List[str] = []
    for n in names:
        layer = resolve_key(n, layers, kind == "sd2")
        if layer is None:
            unmatched.append(n)
            continue
        key = layers[layer]
        rows = None
        if key.endswith("in_proj_weight"):
            third = shapes[key][0] // 3
            i = "qkv".index(n[-6])  # ..._q_proj / _k_proj / _v_proj
            rows = (i * third, (i + 1) * third)
        bindings[n] = Binding(n, key, rows, layer)
    # OpenCLIP attention: all four parts or none
    groups: Dict[str, List[str]] = {}
    for n, b in bindings.items():
        if b.key.endswith("in_proj_weight"):
            groups.setdefault(b.key[: -len("in_proj_weight")], []).append(n)
        elif b.key.endswith(".attn.out_proj.weight") and _is_mha_out(b.key, shapes):
            groups.setdefault(b.key[: -len("out_proj.weight")], []).append(n)
    dropped: List[str] = []
    for members in groups.values():
        have = {"out" if bindings[m].rows is None else m[-6] for m in members}  # m ends in _q_proj ...
        if have != {"q", "k", "v", "out"}:
            for m in members:
                dropped.append(m)
                del bindings[m]
    return bindings, unmatched, dropped


def _is_mha_out(key: str, shapes) -> bool:
    return key[: -len("out_proj.weight")] + "in_proj_weight" in shapes


# ------------------------------------------------------------------ LoRA targets (extract)
@dataclass
class Target:
    name: str
    key: str
    rows: Optional[Tuple[int, int]]
    is_text_encoder: bool
    shape: Tuple[int, ...]  # of the weight slice

    @property
    def is_conv3x3(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)


def lora_targets(shapes: Dict[str, Tuple[int, ...]], kind: str, conv: bool) -> List[Target]:
    """The layers a kohya-style LoRA adapts, named as the trainer names them: Linear/Conv layers of
    the UNet's transformer blocks (+ with ``conv``, ResBlock / Downsample / Upsample layers: LoCon),
    and the text encoders' attention and MLP layers."""
    import re
    out: List[Target] = []
    unet = {k[len(UNET_ROOT):]: s for k, s in shapes.items() if k.startswith(UNET_ROOT)}
    transformers = {k.split(".transformer_blocks.")[0] for k in unet if ".transformer_blocks." in k}
    resblocks = {k.split(".in_layers.")[0] for k in unet if ".in_layers." in k}
    style = "ldm" if kind == "sdxl" else "diffusers"
    for k, shape in unet.items():
        if len(shape) < 2 or not k.endswith(".weight"):
            continue
        path = k[: -len(".weight")]
        ancestors = {".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 1)}
        in_transformer = bool(ancestors & transformers)
        parent = path.rsplit(".", 1)[0]
        in_conv_block = bool(ancestors & resblocks) or path.endswith(".op") or (
            path.endswith(".conv") and parent not in resblocks and parent not in transformers)
        if in_transformer or (conv and in_conv_block):
            out.append(Target(unet_kohya_name(path, style), UNET_ROOT + k, None, False, tuple(shape)))
    for root, _, prefix in TE_ROOTS[kind]:
        for key, shape in shapes.items():
            if not key.startswith(root) or len(shape) < 2:
                continue
            k = _normal(key)[len(root):]
            if k.startswith("transformer.") and re.fullmatch(r"transformer\." + _HF_TARGET + r"\.weight", k):
                out.append(Target(hf_clip_te_name(prefix, k[: -len(".weight")]), key, None, True, tuple(shape)))
            elif re.fullmatch(r"model\.transformer\.resblocks\.\d+\.attn\.in_proj_weight", k):
                base = openclip_te_name(prefix, k[: -len(".in_proj_weight")])
                third = shape[0] // 3
                for i, p in enumerate("qkv"):
                    out.append(Target(f"{base}_{p}_proj", key, (i * third, (i + 1) * third), True,
                                      (third,) + tuple(shape[1:])))
            elif re.fullmatch(r"model\.transformer\.resblocks\.\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.weight", k):
                out.append(Target(openclip_te_name(prefix, k[: -len(".weight")]), key, None, True, tuple(shape)))
    return out


# ------------------------------------------------------------------ writing
def save_new_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a safetensors file that must not exist yet: a temporary file in the same folder, then a
    hard link to the final name (fails instead of replacing a file that appeared meanwhile)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)  # the umask's mode, as an ordinary file (mkstemp's 0600 would stay)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UserError(f"{path} appeared while writing: nothing was replaced; choose another name.") from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise UserError(f"{path} appeared while writing: nothing was replaced; choose another name.") from None
            os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"The disk is full: could not write {path}. Free some space and run again.") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
