"""ΔW of a saved LoRA/LyCORIS module the way the WebUI's Lora loader computes it (v1.10.1,
``extensions-builtin/Lora/network_*.py``: ``calc_updown`` then ``finalize_updown``), independent
of lycoris-lora. Used to check that a trained network and its file agree, and to merge a file into
a model (:func:`merged_into`).

Module types by key set, as the WebUI detects them: lora (``lora_up/lora_down`` [+ ``lora_mid``]),
hada (LoHa), lokr, ia3 (``weight`` + ``on_input``), full (``diff`` [+ ``diff_b``]), oft
(``oft_blocks``, 3-D diag-OFT or 4-D BOFT), norm (``w_norm``/``b_norm``); ``alpha``/``scale`` and
``dora_scale`` apply to all.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .naming import resolve_key, webui_layer_names

Tensors = Dict[str, torch.Tensor]


def group_modules(sd: Tensors) -> Dict[str, Tensors]:
    mods: Dict[str, Tensors] = defaultdict(dict)
    for k, v in sd.items():
        name, _, weight = k.partition(".")
        mods[name][weight] = v
    return dict(mods)


def module_type(w: Tensors) -> Optional[str]:
    if "lora_up.weight" in w and "lora_down.weight" in w:
        return "lora"
    if all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "hada"
    if ("lokr_w1" in w or "lokr_w1_a" in w) and ("lokr_w2" in w or "lokr_w2_a" in w):
        return "lokr"
    if "weight" in w:
        return "ia3"
    if "diff" in w:
        return "full"
    if "oft_blocks" in w or "oft_diag" in w:
        return "oft"
    if "w_norm" in w and "b_norm" in w:
        return "norm"
    return None


def _cp(t, wa, wb):
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _conventional(up, down, shape):
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def _oft(w: Tensors, orig: torch.Tensor) -> torch.Tensor:
    from einops import rearrange
    blocks = w["oft_blocks"].float()
    alpha = w.get("alpha")
    out_dim = orig.shape[0]
    is_boft = blocks.dim() == 4
    if is_boft:
        m, num_blocks, block_size = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    else:
        num_blocks = blocks.shape[0]
        block_size = out_dim // num_blocks
    constraint = (0 if alpha is None else float(alpha)) * out_dim
    eye = torch.eye(block_size, device=blocks.device)
    q = blocks - blocks.transpose(-1, -2)
    if constraint != 0:
        norm_q = torch.norm(q.flatten())
        new_norm = torch.clamp(norm_q, max=constraint)
        q = q * ((new_norm + 1e-8) / (norm_q + 1e-8))
    r = torch.matmul(eye + q, (eye - q).float().inverse())
    weight = orig.float()
    if not is_boft:
        merged = rearrange(weight, "(k n) ... -> k n ...", k=num_blocks, n=block_size)
        merged = torch.einsum("k n m, k n ... -> k m ...", r, merged)
        merged = rearrange(merged, "k m ... -> (k m) ...")
    else:
        inp, r_b = weight, block_size // 2
        for i in range(m):
            inp = rearrange(inp, "(c g k) ... -> (c k g) ...", g=2, k=2 ** i * r_b)
            inp = rearrange(inp, "(d b) ... -> d b ...", b=block_size)
            inp = torch.einsum("b i j, b j ... -> b i ...", r[i], inp)
            inp = rearrange(inp, "d b ... -> (d b) ...")
            inp = rearrange(inp, "(c k g) ... -> (c g k) ...", g=2, k=2 ** i * r_b)
        merged = inp
    if "rescale" in w:
        merged = w["rescale"].float().reshape(-1, *[1] * (orig.dim() - 1)) * merged
    return merged - weight


def updown(w: Tensors, orig_weight: torch.Tensor, multiplier: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(ΔW, Δbias or None) for one module, in the layer's weight shape, scaled as the WebUI does."""
    w = {k: v.float() for k, v in w.items()}
    orig = orig_weight.float()
    kind = module_type(w)
    dim = None
    ex_bias = None
    scale_override = None
    if kind == "lora":
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        shape = [up.size(0), down.size(1)]
        if "lora_mid.weight" in w:
            mid = w["lora_mid.weight"]
            d = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1),
                             down.reshape(down.size(0), -1))
        else:
            if down.dim() == 4:
                shape += list(down.shape[2:])
            d = _conventional(up, down, shape)
    elif kind == "hada":
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in w:
            shape = [w1a.size(1), w1b.size(1)] + list(w["hada_t1"].shape[2:])
            d1 = _cp(w["hada_t1"], w1a, w1b)
        else:
            if w1b.dim() == 4:
                shape += list(w1b.shape[2:])
            d1 = _conventional(w1a, w1b, shape)
        d2 = _cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else _conventional(w2a, w2b, shape)
        d = d1 * d2
    elif kind == "lokr":
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w1_b" in w:
            dim = w["lokr_w1_b"].shape[0]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        if "lokr_w2_b" in w:
            dim = w["lokr_w2_b"].shape[0]
        shape = list(orig.shape) if orig.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        d = torch.kron(w1, w2.contiguous()).reshape(shape)
    elif kind == "ia3":
        iw = w["weight"]
        if not bool(w.get("on_input", torch.tensor(False)).item()):
            iw = iw.reshape(-1, 1)
        d = orig * iw
    elif kind == "full":
        d = w["diff"]
        ex_bias = w.get("diff_b")
    elif kind == "oft":
        d = _oft(w, orig)
        scale_override = 1.0
    elif kind == "norm":
        d = w["w_norm"]
        ex_bias = w.get("b_norm")
    else:
        raise ValueError(f"unknown module type with keys {sorted(w)}")
    # finalize_updown
    if "bias" in w:
        d = (d.reshape(w["bias"].shape) + w["bias"]).reshape(orig.shape)
    if d.numel() == orig.numel():
        d = d.reshape(orig.shape)
    if scale_override is not None:
        scale = scale_override
    elif "scale" in w:
        scale = float(w["scale"])
    elif dim is not None and "alpha" in w:
        scale = float(w["alpha"]) / dim
    else:
        scale = 1.0
    d = d * scale
    if "dora_scale" in w:
        ds = w["dora_scale"]
        merged = d + orig
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1))
        d = merged * (ds / norm) - orig
    if ex_bias is not None:
        ex_bias = ex_bias * multiplier
    return d * multiplier, ex_bias


@contextlib.contextmanager
def merged_into(unet: nn.Module, text_encoders, sd: Tensors, multiplier: float = 1.0,
                is_sd2: Optional[bool] = None) -> Iterator[List[str]]:
    """Temporarily add every module of a file into the model's weights the WebUI's way; yields the
    module names that resolved to no layer (the WebUI ignores those). Weights are restored after."""
    layers = webui_layer_names(unet, text_encoders)
    if is_sd2 is None:
        is_sd2 = "model_transformer_resblocks_0_attn" in layers
    unmatched: List[str] = []
    backups = []
    try:
        with torch.no_grad():
            for name, w in group_modules(sd).items():
                key = resolve_key(name, layers, is_sd2)
                layer = layers.get(key) if key else None
                if layer is None or not hasattr(layer, "weight") or isinstance(layer, nn.MultiheadAttention):
                    unmatched.append(name)
                    continue
                d, b = updown(w, layer.weight, multiplier)
                backups.append((layer.weight, layer.weight.detach().clone()))
                layer.weight += d.to(layer.weight.dtype)
                if b is not None and getattr(layer, "bias", None) is not None:
                    backups.append((layer.bias, layer.bias.detach().clone()))
                    layer.bias += b.to(layer.bias.dtype)
        yield unmatched
    finally:
        with torch.no_grad():
            for p, old in reversed(backups):
                p.copy_(old)
