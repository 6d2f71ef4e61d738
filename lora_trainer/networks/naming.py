"""Module names: which layers a LoRA trains, the kohya key each is saved under, and how the WebUI's
Lora loader resolves such a key back to a layer.

kohya writes SD1/SD2 UNet keys in diffusers naming (``lora_unet_down_blocks_0_attentions_0_proj_in``)
and text-encoder keys in Hugging Face CLIP naming (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``),
and SDXL UNet keys in LDM naming (``lora_unet_input_blocks_4_1_...``). We write the same. The
diffusers name of each LDM layer is derived, then checked by running the WebUI's own conversion
rule back: where a model's layout does not fit the WebUI's fixed formulas, the LDM name (which the
WebUI also accepts) is written instead, so every key always resolves.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

UNET_PREFIX = "lora_unet"
TRANSFORMER_CLASSES = {"SpatialTransformer", "SpatialTransformer3D"}
CONV_BLOCK_CLASSES = {"ResBlock", "Downsample", "Upsample"}
HF_CLIP_TARGETS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}

_RESNET_TO_DIFFUSERS = {"in_layers_2": "conv1", "out_layers_3": "conv2", "in_layers_0": "norm1",
                        "out_layers_0": "norm2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_RESNET_TO_LDM = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
_OPENCLIP_TO_HF = (("attn", "self_attn"), ("mlp_c_fc", "mlp_fc1"), ("mlp_c_proj", "mlp_fc2"))


@dataclass
class Target:
    """One layer to adapt. ``kind`` is linear, conv (kernel > 1), conv1x1 or mha (OpenCLIP attention)."""
    name: str            # kohya module name (no dots)
    module: nn.Module
    kind: str
    is_text_encoder: bool


# ------------------------------------------------------------------ the WebUI's rule (Lora/networks.py)
def webui_convert_name(key: str, is_sd2: bool) -> str:
    """The WebUI's ``convert_diffusers_name_to_compvis``: kohya/diffusers module name -> its layer name."""
    def sfx(kind: str, rest: str) -> str:
        return _RESNET_TO_LDM.get(rest, rest) if kind == "resnets" else rest

    if (m := re.fullmatch(r"lora_unet_conv_in(.*)", key)):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if (m := re.fullmatch(r"lora_unet_conv_out(.*)", key)):
        return f"diffusion_model_out_2{m[1]}"
    if (m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if (m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{sfx(m[2], m[4])}"
    if (m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{sfx(m[1], m[3])}"
    if (m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{sfx(m[2], m[4])}"
    if (m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if (m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    if (m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_hf_to_openclip(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if (m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)):
        return f"1_model_transformer_resblocks_{m[1]}_{_hf_to_openclip(m[2])}"
    return key


def _hf_to_openclip(rest: str) -> str:
    for oc, hf in _OPENCLIP_TO_HF:
        rest = rest.replace(hf, oc)
    return rest


def resolve_key(module_name: str, layers: Dict[str, object], is_sd2: bool) -> Optional[str]:
    """The WebUI layer a saved module name binds to, by the Lora loader's rules, or None (ignored key)."""
    key = webui_convert_name(module_name, is_sd2)
    if key in layers:
        return key
    for proj in ("_q_proj", "_k_proj", "_v_proj"):
        if key.endswith(proj) and key[: -len(proj)] in layers:
            return key[: -len(proj)]
    if "lora_unet" in module_name:
        k = module_name.replace("lora_unet", "diffusion_model")
        if k in layers:
            return k
    if "lora_te1_text_model" in module_name:
        for rep in ("0_transformer_text_model", "transformer_text_model"):
            k = module_name.replace("lora_te1_text_model", rep)
            if k in layers:
                return k
    return None


def webui_layer_names(unet: nn.Module, text_encoders: Iterable[Tuple[str, nn.Module]]) -> Dict[str, nn.Module]:
    """The layer names the WebUI gives a model's modules (``named_modules`` paths, dots as underscores).

    ``text_encoders`` are the inner embedders (``cond_stage_model.wrapped``); SDXL's second one is
    numbered ``1_`` and its first ``0_``.
    """
    out: Dict[str, nn.Module] = {}
    for name, m in unet.named_modules():
        if name:
            out["diffusion_model_" + name.replace(".", "_")] = m
    tes = list(text_encoders)
    for i, (_, te) in enumerate(tes):
        pre = f"{i}_" if len(tes) > 1 else ""
        for name, m in te.named_modules():
            if name:
                out[pre + name.replace(".", "_")] = m
    return out


# ------------------------------------------------------------------ LDM -> kohya names
def unet_diffusers_name(ldm_path: str) -> Optional[str]:
    """``input_blocks.1.1.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in`` (None if no form)."""
    p = ldm_path.replace(".", "_")
    if (m := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", p)):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        i, j = divmod(n - 1, 3)
        if j == 2:
            return f"lora_unet_down_blocks_{i}_downsamplers_0_conv" if rest == "op" else None
        if k == 0:
            return f"lora_unet_down_blocks_{i}_resnets_{j}_{_RESNET_TO_DIFFUSERS.get(rest, rest)}"
        return f"lora_unet_down_blocks_{i}_attentions_{j}_{rest}"
    if (m := re.fullmatch(r"middle_block_(\d+)_(.+)", p)):
        k, rest = int(m[1]), m[2]
        if k == 1:
            return f"lora_unet_mid_block_attentions_0_{rest}"
        return f"lora_unet_mid_block_resnets_{k // 2}_{_RESNET_TO_DIFFUSERS.get(rest, rest)}"
    if (m := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", p)):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, 3)
        if rest == "conv" and k > 0:
            return f"lora_unet_up_blocks_{i}_upsamplers_0_conv"
        if k == 0:
            return f"lora_unet_up_blocks_{i}_resnets_{j}_{_RESNET_TO_DIFFUSERS.get(rest, rest)}"
        return f"lora_unet_up_blocks_{i}_attentions_{j}_{rest}"
    return None


def unet_kohya_name(ldm_path: str, style: str = "diffusers") -> str:
    ldm_name = f"{UNET_PREFIX}_{ldm_path.replace('.', '_')}"
    if style == "ldm":
        return ldm_name
    d = unet_diffusers_name(ldm_path)
    # keep the diffusers form only where the WebUI's formula maps it back to this very layer
    if d is not None and webui_convert_name(d, False) == "diffusion_model_" + ldm_path.replace(".", "_"):
        return d
    return ldm_name


def hf_clip_te_name(prefix: str, path: str) -> str:
    """``transformer.text_model.encoder.layers.0.self_attn.q_proj`` -> ``lora_te_text_model_..._q_proj``."""
    path = re.sub(r"^(transformer\.|wrapped\.transformer\.)", "", path)
    return f"{prefix}_{path.replace('.', '_')}"


def openclip_te_name(prefix: str, path: str) -> str:
    """``model.transformer.resblocks.3.mlp.c_fc`` -> ``lora_te_text_model_encoder_layers_3_mlp_fc1``."""
    m = re.search(r"transformer\.resblocks\.(\d+)\.(.+)$", path)
    if not m:
        raise ValueError(f"not an OpenCLIP text layer: {path}")
    rest = m[2].replace(".", "_")
    for oc, hf in _OPENCLIP_TO_HF:
        if rest == oc or rest.startswith(oc + "_"):
            rest = hf + rest[len(oc):]
            break
    return f"{prefix}_text_model_encoder_layers_{m[1]}_{rest}"


# ------------------------------------------------------------------ which layers to train
def _kind_of(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv1x1" if tuple(m.kernel_size) == (1, 1) else "conv"
    return None


def unet_targets(unet: nn.Module, include_conv_blocks: bool, style: str = "diffusers") -> List[Target]:
    """Linear/Conv2d layers inside the UNet's transformer blocks (+ ResBlock/down/upsample convs for LoCon)."""
    out: List[Target] = []
    seen = set()
    classes = TRANSFORMER_CLASSES | (CONV_BLOCK_CLASSES if include_conv_blocks else set())
    for parent_name, parent in unet.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_name, child in parent.named_modules():
            kind = _kind_of(child)
            if kind is None or not child_name:
                continue
            path = f"{parent_name}.{child_name}"
            if path in seen:
                continue
            seen.add(path)
            out.append(Target(unet_kohya_name(path, style), child, kind, False))
    return out


def text_encoder_targets(prefix: str, te: nn.Module) -> List[Target]:
    """Attention and MLP layers of an HF CLIP text model or an OpenCLIP text transformer."""
    out: List[Target] = []
    for parent_name, parent in te.named_modules():
        cls = type(parent).__name__
        if cls in HF_CLIP_TARGETS:
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    out.append(Target(hf_clip_te_name(prefix, f"{parent_name}.{child_name}"), child, "linear", True))
        elif cls == "ResidualAttentionBlock" and isinstance(getattr(parent, "attn", None), nn.MultiheadAttention):
            out.append(Target(openclip_te_name(prefix, f"{parent_name}.attn"), parent.attn, "mha", True))
            mlp = getattr(parent, "mlp", None)
            for child_name in ("c_fc", "c_proj"):
                child = getattr(mlp, child_name, None) if mlp is not None else None
                if isinstance(child, nn.Linear):
                    out.append(Target(openclip_te_name(prefix, f"{parent_name}.mlp.{child_name}"), child, "linear", True))
    return out
