"""The SDXL UNet for the standalone CLI: diffusers' ``UNet2DConditionModel`` (there is no ``sgm`` on
PyPI), seen through an LDM-named view.

``LDMUNetView`` holds the *same* module objects as the diffusers UNet, arranged and named as sgm's
``UNetModel`` names them (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``middle_block.0.in_layers.2``,
``label_emb.0.0`` ...). So one structure does three jobs:
- its ``state_dict()`` keys are the checkpoint's ``model.diffusion_model.*`` keys: a single-file SDXL
  checkpoint loads with ``load_state_dict(strict=True)``, every key and shape checked;
- the networks walk it exactly as they walk the WebUI's sgm UNet (class names ``SpatialTransformer``,
  ``ResBlock``, ``Downsample``, ``Upsample``), so a CLI run and a WebUI run write the same keys;
- its ``forward`` runs the diffusers model, whose layers are the ones the networks patch.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from .errors import UserError


class SpatialTransformer(nn.Module):
    """sgm's SpatialTransformer names over a diffusers Transformer2DModel (norm, proj_in, transformer_blocks, proj_out)."""

    def __init__(self, t2d: nn.Module):
        super().__init__()
        self.norm = t2d.norm
        self.proj_in = t2d.proj_in
        self.transformer_blocks = t2d.transformer_blocks
        self.proj_out = t2d.proj_out


class ResBlock(nn.Module):
    """sgm's ResBlock names over a diffusers ResnetBlock2D."""

    def __init__(self, r: nn.Module):
        super().__init__()
        self.in_layers = nn.Sequential(r.norm1, nn.SiLU(), r.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), r.time_emb_proj)
        self.out_layers = nn.Sequential(r.norm2, nn.SiLU(), nn.Dropout(0.0), r.conv2)
        self.skip_connection = r.conv_shortcut if r.conv_shortcut is not None else nn.Identity()


class Downsample(nn.Module):
    def __init__(self, d: nn.Module):
        super().__init__()
        self.op = d.conv


class Upsample(nn.Module):
    def __init__(self, u: nn.Module):
        super().__init__()
        self.conv = u.conv


class LDMUNetView(nn.Module):
    """The diffusers UNet's modules under sgm's names; ``forward`` is sgm's signature over diffusers."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.__dict__["diffusers_unet"] = unet   # not a child: state_dict() holds LDM keys only
        self.time_embed = nn.Sequential(unet.time_embedding.linear_1, nn.SiLU(), unet.time_embedding.linear_2)
        self.label_emb = nn.Sequential(nn.Sequential(unet.add_embedding.linear_1, nn.SiLU(), unet.add_embedding.linear_2))
        inputs: List[nn.Module] = [nn.Sequential(unet.conv_in)]
        for i, down in enumerate(unet.down_blocks):
            attns = getattr(down, "attentions", None)
            for j, res in enumerate(down.resnets):
                parts = [ResBlock(res)] + ([SpatialTransformer(attns[j])] if attns is not None else [])
                inputs.append(nn.Sequential(*parts))
            if down.downsamplers is not None:
                inputs.append(nn.Sequential(Downsample(down.downsamplers[0])))
        self.input_blocks = nn.ModuleList(inputs)
        mid = unet.mid_block
        self.middle_block = nn.Sequential(ResBlock(mid.resnets[0]), SpatialTransformer(mid.attentions[0]),
                                          ResBlock(mid.resnets[1]))
        outputs: List[nn.Module] = []
        for up in unet.up_blocks:
            attns = getattr(up, "attentions", None)
            for j, res in enumerate(up.resnets):
                parts = [ResBlock(res)] + ([SpatialTransformer(attns[j])] if attns is not None else [])
                if j == len(up.resnets) - 1 and up.upsamplers is not None:
                    parts.append(Upsample(up.upsamplers[0]))
                outputs.append(nn.Sequential(*parts))
        self.output_blocks = nn.ModuleList(outputs)
        self.out = nn.Sequential(unet.conv_norm_out, nn.SiLU(), unet.conv_out)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        """sgm's ``vector`` is pooled text + the size embeddings of ``time_ids`` (orig h,w, crop top,left,
        target h,w); diffusers builds it from the same two parts."""
        return self.diffusers_unet(x, timesteps, encoder_hidden_states=context,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


# ------------------------------------------------------------------ sgm UNet config -> diffusers
def diffusers_config(p: Dict[str, Any]) -> Dict[str, Any]:
    """The diffusers UNet2DConditionModel config for sgm ``UNetModel`` params (an SDXL yaml's
    ``network_config.params``)."""
    mult = list(p.get("channel_mult", [1, 2, 4]))
    mc = int(p["model_channels"])
    levels = len(mult)
    attn_res = set(p.get("attention_resolutions", []))
    depth = p.get("transformer_depth", 1)
    depth = [int(depth)] * levels if isinstance(depth, int) else [int(d) for d in depth]
    if p.get("transformer_depth_middle") not in (None, depth[-1]):
        raise UserError("This SDXL UNet's middle block depth differs from its last level's: not a layout diffusers builds.")
    has_attn = [2 ** i in attn_res for i in range(levels)]
    channels = [mc * m for m in mult]
    if p.get("num_head_channels", -1) not in (-1, None):
        heads = [max(1, c // int(p["num_head_channels"])) for c in channels]
    else:
        heads = [int(p.get("num_heads", 8))] * levels
    if not p.get("use_linear_in_transformer", False):
        raise UserError("This UNet uses convolutional transformer projections: the CLI's SDXL path expects SDXL's linear ones.")
    ted = mc * 4
    adm = int(p["adm_in_channels"])
    context = p["context_dim"]
    context = int(context[0] if isinstance(context, (list, tuple)) else context)
    time_dim = 256
    return dict(
        sample_size=128, in_channels=int(p.get("in_channels", 4)), out_channels=int(p.get("out_channels", 4)),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=tuple(channels),
        layers_per_block=int(p.get("num_res_blocks", 2)), cross_attention_dim=context,
        transformer_layers_per_block=tuple(depth), attention_head_dim=tuple(heads), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=adm, time_embedding_dim=None if ted == channels[0] * 4 else ted,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    )


def pooled_dim(p: Dict[str, Any]) -> int:
    """Width of the pooled text embedding in ``vector`` (adm channels minus 3 size pairs x 256)."""
    return int(p["adm_in_channels"]) - 6 * 256


# SDXL base 1.0's UNet (sd_xl_base.yaml's network_config), for checkpoints without a yaml
SDXL_BASE_UNET = dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4,
                      model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                      num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                      transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax-xformers",
                      legacy=False)


def build_unet(params: Dict[str, Any], device: str = "cpu") -> LDMUNetView:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise UserError("SDXL in the CLI needs diffusers (its UNet code): pip install 'diffusers>=0.27,<0.36'. "
                        "(Inside the WebUI, the loaded model is used and diffusers is not needed.)") from None
    unet = UNet2DConditionModel(**diffusers_config(params))
    unet.set_default_attn_processor()   # torch SDPA (AttnProcessor2_0)
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor(AttnProcessor2_0())
    except Exception:  # older/newer diffusers: keep its default
        pass
    return LDMUNetView(unet.to(device))
