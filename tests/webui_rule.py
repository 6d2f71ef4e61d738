"""An independent re-implementation of how the WebUI applies a LoRA file (research §4-§5): resolve
each module name to a layer by the Lora loader's rules, then add ΔW = up @ down * alpha/dim *
multiplier into that layer's weight (OpenCLIP attention: q/k/v stacked into in_proj_weight, only when
all four of q, k, v, out are present). Used by tests as the reference "loaded the WebUI's way"."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from lora_trainer.networks.naming import resolve_key, webui_layer_names


def group_modules(sd):
    mods = defaultdict(dict)
    for k, v in sd.items():
        name, _, weight = k.partition(".")
        mods[name][weight] = v
    return mods


def delta(w: dict, target_shape) -> torch.Tensor:
    up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()
    dim = down.shape[0]
    scale = float(w["alpha"]) / dim if "alpha" in w else 1.0
    d = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    return (d * scale).reshape(target_shape)


@contextlib.contextmanager
def merged_the_webui_way(host, sd, multiplier=1.0, is_sd2=None):
    """Temporarily merge the file's ΔW into the host's weights; yields (unmatched, resolved) names."""
    layers = webui_layer_names(host.unet, host.text_encoders)
    if is_sd2 is None:
        is_sd2 = "model_transformer_resblocks_0_attn" in layers
    backups = []
    unmatched = []
    mha = defaultdict(dict)
    try:
        with torch.no_grad():
            for name, w in group_modules(sd).items():
                layer = resolve_key(name, layers, is_sd2)
                if layer is None:
                    unmatched.append(name)
                    continue
                module = layers[layer]
                if isinstance(module, torch.nn.MultiheadAttention):
                    mha[layer][name.rsplit("_", 2)[-2]] = w
                    continue
                backups.append((module.weight, module.weight.detach().clone()))
                module.weight += delta(w, module.weight.shape).to(module.weight.dtype) * multiplier
            for layer, parts in mha.items():
                m = layers[layer]
                if set(parts) != {"q", "k", "v"}:
                    continue
                e = m.embed_dim
                d_in = torch.cat([delta(parts[p], (e, e)) for p in ("q", "k", "v")])
                backups.append((m.in_proj_weight, m.in_proj_weight.detach().clone()))
                m.in_proj_weight += d_in.to(m.in_proj_weight.dtype) * multiplier
        yield unmatched
    finally:
        with torch.no_grad():
            for p, old in reversed(backups):
                p.copy_(old)
