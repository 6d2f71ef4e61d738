"""SDXL's two text encoders for the standalone CLI, in the module layout of the WebUI's sgm embedders
(so LoRA names and the checkpoint's ``conditioner.embedders.N.*`` keys match without conversion):

- ``CLIPLEmbedder``: ``.transformer`` = transformers' ``CLIPTextModel`` (embedders.0); SDXL takes the
  hidden state of layer ``layer_idx`` (11 of 12: the penultimate), without the final layer norm.
- ``OpenCLIPGEmbedder``: ``.model`` = the OpenCLIP text tower (open_clip's ``Transformer``; embedders.1);
  SDXL takes the penultimate layer's output, and the pooled embedding from the last layer after
  ``ln_final``, at the end-of-text token, times ``text_projection``.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn


class CLIPLEmbedder(nn.Module):
    def __init__(self, transformer: nn.Module, tokenizer, layer: str = "hidden", layer_idx: int = 11):
        super().__init__()
        self.transformer = transformer
        self.__dict__["tokenizer"] = tokenizer
        self.layer, self.layer_idx = layer, layer_idx

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=ids, output_hidden_states=self.layer == "hidden")
        return out.hidden_states[self.layer_idx] if self.layer == "hidden" else out.last_hidden_state


class OpenCLIPTextTower(nn.Module):
    """The text half of an open_clip ``CLIP`` model, with its attribute (and state_dict) names."""

    def __init__(self, width: int, layers: int, heads: int, output_dim: int, vocab_size: int = 49408,
                 context_length: int = 77, mlp_ratio: float = 4.0):
        super().__init__()
        from open_clip.transformer import Transformer
        self.transformer = Transformer(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                       act_layer=nn.GELU)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width).normal_(std=0.01))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim).normal_(std=width ** -0.5))
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6052)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


class OpenCLIPGEmbedder(nn.Module):
    def __init__(self, model: OpenCLIPTextTower):
        super().__init__()
        self.model = model

    def encode(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B,77,W), pooled (B,P))."""
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        mask = m.attn_mask.to(x.dtype) if x.dtype.is_floating_point else m.attn_mask
        blocks = m.transformer.resblocks
        penultimate = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            x = block(x, attn_mask=mask)
        if not batch_first:
            x, penultimate = x.permute(1, 0, 2), penultimate.permute(1, 0, 2)
        last = m.ln_final(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)] @ m.text_projection
        return penultimate, pooled


# ------------------------------------------------------------------ building from a checkpoint
def _openclip_text_cfg(arch: str) -> Dict[str, Any]:
    """The text_cfg of an open_clip architecture name (built-in, registered, or an offline ``hf-hub:`` entry)."""
    import open_clip
    if arch.startswith("hf-hub:"):
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(arch[len("hf-hub:"):], "open_clip_config.json")
            with open(path, encoding="utf-8") as f:
                return json.load(f)["model_cfg"].get("text_cfg", {})
        except Exception:
            return {}
    cfg = open_clip.get_model_config(arch) or {}
    return cfg.get("text_cfg", {})


def build_openclip_g(sd: Dict[str, torch.Tensor], prefix: str, arch: str = "ViT-bigG-14") -> OpenCLIPGEmbedder:
    """The tower sized from the checkpoint's tensors; heads from ``arch``'s config (64-wide heads otherwise)."""
    width = sd[prefix + "ln_final.weight"].shape[0]
    layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in sd if k.startswith(prefix + "transformer.resblocks."))
    output_dim = sd[prefix + "text_projection"].shape[1]
    vocab, ctx = sd[prefix + "token_embedding.weight"].shape[0], sd[prefix + "positional_embedding"].shape[0]
    mlp = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    tc = _openclip_text_cfg(arch)
    heads = int(tc["heads"]) if tc.get("width") == width and "heads" in tc else max(1, width // 64)
    return OpenCLIPGEmbedder(OpenCLIPTextTower(width, layers, heads, output_dim, vocab, ctx, mlp))


def build_clip_l(version: str, layer: str, layer_idx: int) -> CLIPLEmbedder:
    """CLIP-L from its config and tokenizer (the Hugging Face cache entry or a folder, as the WebUI
    reads them); the checkpoint brings the weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    return CLIPLEmbedder(CLIPTextModel(CLIPTextConfig.from_pretrained(version)), CLIPTokenizer.from_pretrained(version),
                         layer, layer_idx)
