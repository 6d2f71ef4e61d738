"""Tiny, randomly initialised Stable Diffusion models in the real LDM layout, and a synthetic dataset.

They power ``python -m lora_trainer demo`` and the tests: same classes and module names as the
WebUI loads (2 res blocks per level and an 8x VAE, so LoRA key names resolve as for real models),
built offline. The CLIP tokenizer is the real one, regenerated from the BPE table that ships inside
``open_clip``; the text encoder weights are random.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
            num_res_blocks=2, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
            transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False)

VAE = dict(embed_dim=4, lossconfig={"target": "torch.nn.Identity"},
           ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                         ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0))

OPENCLIP_ARCH = "lora-trainer-tiny-openclip"
OPENCLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}


def write_clip_tokenizer_dir(out_dir: Path) -> Path:
    """An offline ``CLIPTokenizer`` + tiny ``CLIPTextModel`` folder (what FrozenCLIPEmbedder(version=DIR) loads)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "vocab.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    import open_clip.tokenizer as oct
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    bpe = Path(oct.default_bpe())
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(str(out_dir))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def register_tiny_openclip(folder: Path) -> Path:
    import open_clip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip names an architecture after its file's stem; the .openclip.json copy marks it for
    # ldm_host.load_checkpoint, which registers every such file found beside a model's yaml
    named = folder / f"{OPENCLIP_ARCH}.json"
    for path in (named, folder / f"{OPENCLIP_ARCH}.openclip.json"):
        path.write_text(json.dumps(OPENCLIP_CFG))
    open_clip.add_model_config(str(named))
    return named


def model_config(kind: str = "sd1", tokenizer_dir: Optional[Path] = None) -> Dict:
    """The LDM config dict of a tiny SD1 (epsilon), SD2 (epsilon) or SD2-v (v-prediction) model."""
    unet = copy.deepcopy(UNET)
    params = {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": copy.deepcopy(VAE)},
    }
    if kind == "sd1":
        unet["num_heads"] = 2
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                       "params": {"version": str(tokenizer_dir), "device": "cpu"}}
    elif kind in ("sd2", "sd2-v"):
        unet.pop("num_heads")
        unet.update(num_head_channels=16, use_linear_in_transformer=True)
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                       "params": {"arch": OPENCLIP_ARCH, "version": None, "device": "cpu",
                                                  "freeze": True, "layer": "penultimate"}}
        if kind == "sd2-v":
            params["parameterization"] = "v"
    else:
        raise ValueError(kind)
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def build_model(kind: str = "sd1", work_dir: Optional[Path] = None, seed: int = 0, use_checkpoint: bool = False):
    """A tiny random LatentDiffusion (seeded, so every build is identical). ``use_checkpoint`` sets
    ldm's own gradient-checkpointing flags, as real SD yamls do."""
    from .ldm_host import instantiate
    work_dir = Path(work_dir or os.path.join(os.path.expanduser("~"), ".cache", "lora_trainer", "tiny"))
    tok = write_clip_tokenizer_dir(work_dir / "clip-tokenizer") if kind == "sd1" else None
    if kind != "sd1":
        register_tiny_openclip(work_dir)
    torch.manual_seed(seed)
    config = model_config(kind, tok)
    config["model"]["params"]["unet_config"]["params"]["use_checkpoint"] = use_checkpoint
    model = instantiate(config)
    # random but not degenerate: ldm zero-initialises the UNet's output convs, which would make
    # the base model predict 0 everywhere; give them small random values so LoRAs change images
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.model.diffusion_model.named_parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def host(kind: str = "sd1", work_dir: Optional[Path] = None, seed: int = 0):
    from .ldm_host import LDMHost
    return LDMHost(build_model(kind, work_dir, seed), name=f"tiny-{kind}.safetensors")


def save_checkpoint(model, out_dir: Path, kind: str = "sd1", name: Optional[str] = None) -> Path:
    """``<name>.safetensors`` + ``<name>.yaml`` in the layout the WebUI and ``train`` load."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"tiny-{kind}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / f"{name}.safetensors"))
    tok = out_dir / "clip-tokenizer"
    if kind == "sd1":
        write_clip_tokenizer_dir(tok)
    else:
        register_tiny_openclip(out_dir)
    OmegaConf.save(OmegaConf.create(model_config(kind, tok.resolve())), str(out_dir / f"{name}.yaml"))
    return out_dir / f"{name}.safetensors"


# ------------------------------------------------------------------ synthetic dataset
def make_dataset(root: Path, *, size: int = 64, seed: int = 0, concepts=None) -> Path:
    """Concept folders of simple coloured-shape images with booru-style captions.

    Default: ``3_redcircle`` (4 images, one without caption) and ``1_bluesquare`` (3 images,
    one of them 96x64 so buckets differ).
    """
    from PIL import Image, ImageDraw
    import random
    rnd = random.Random(seed)
    root = Path(root)
    concepts = concepts or [
        ("3_redcircle", (220, 40, 40), "circle", 4, [None, "trigger_a, red circle, simple background",
                                                       "trigger_a, red circle, white background",
                                                       "trigger_a, red circle, large"]),
        ("1_bluesquare", (40, 60, 220), "square", 3, ["trigger_b, blue square, simple background",
                                                        "trigger_b, blue square, small",
                                                        "trigger_b, blue square, wide"]),
    ]
    for folder, colour, shape, n, captions in concepts:
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w = size * 3 // 2 if (shape == "square" and i == n - 1) else size
            img = Image.new("RGB", (w, size), (250, 250, 245))
            dr = ImageDraw.Draw(img)
            r = rnd.randint(size // 5, size // 3)
            cx, cy = rnd.randint(r, w - r), rnd.randint(r, size - r)
            box = [cx - r, cy - r, cx + r, cy + r]
            (dr.ellipse if shape == "circle" else dr.rectangle)(box, fill=colour)
            img.save(d / f"img{i}.png")
            if captions[i] is not None:
                (d / f"img{i}.txt").write_text(captions[i], encoding="utf-8")
    return root


# ------------------------------------------------------------------ tiny SDXL (the sgm checkpoint layout)
SDXL_UNET = dict(adm_in_channels=32 + 6 * 256, num_classes="sequential", in_channels=4, out_channels=4,
                 model_channels=32, attention_resolutions=[2], num_res_blocks=2, channel_mult=[1, 2],
                 num_head_channels=16, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=[1, 2], context_dim=64, spatial_transformer_attn_type="softmax", legacy=False)


def sdxl_config(tokenizer_dir: Path, v: bool = False) -> Dict:
    """An sgm DiffusionEngine yaml for the tiny SDXL (the layout of SDXL's own sd_xl_base.yaml)."""
    emb = lambda key, target, params: {"is_trainable": False, "input_key": key,  # noqa: E731
                                       "target": f"sgm.modules.encoders.modules.{target}", "params": params}
    scaling = "VScaling" if v else "EpsScaling"
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                           "params": copy.deepcopy(SDXL_UNET)},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            emb("txt", "FrozenCLIPEmbedder", {"layer": "hidden", "layer_idx": CLIP_TEXT["num_hidden_layers"] - 1,
                                               "version": str(tokenizer_dir)}),
            emb("txt", "FrozenOpenCLIPEmbedder2", {"arch": OPENCLIP_ARCH, "version": None, "freeze": True,
                                                    "layer": "penultimate", "always_return_pooled": True,
                                                    "legacy": False}),
            emb("original_size_as_tuple", "ConcatTimestepEmbedderND", {"outdim": 256}),
            emb("crop_coords_top_left", "ConcatTimestepEmbedderND", {"outdim": 256}),
            emb("target_size_as_tuple", "ConcatTimestepEmbedderND", {"outdim": 256})]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dict(copy.deepcopy(VAE["ddconfig"]), attn_type="vanilla"),
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def save_sdxl_checkpoint(out_dir: Path, name: str = "tiny-sdxl", seed: int = 0, v: bool = False) -> Path:
    """A tiny random SDXL as ``<name>.safetensors`` (sgm keys: model.diffusion_model.*, conditioner.embedders.0/1.*,
    first_stage_model.*) + ``<name>.yaml``, built with the CLI's own SDXL model code."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    from .sdxl_host import build_vae
    from .sdxl_text import OpenCLIPTextTower
    from .sdxl_unet import build_unet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = write_clip_tokenizer_dir(out_dir / "clip-tokenizer")
    register_tiny_openclip(out_dir)
    torch.manual_seed(seed)
    parts = {"model.diffusion_model.": build_unet(SDXL_UNET),
             "conditioner.embedders.0.transformer.": CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)),
             "conditioner.embedders.1.model.": OpenCLIPTextTower(32, 2, 2, 32),
             "first_stage_model.": build_vae(VAE["ddconfig"])}
    sd = {p + k: v.detach().contiguous().clone() for p, m in parts.items() for k, v in m.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    path = out_dir / f"{name}.safetensors"
    save_file(sd, str(path))
    OmegaConf.save(OmegaConf.create(sdxl_config(tok.resolve(), v)), str(out_dir / f"{name}.yaml"))
    return path


def sdxl_host(work_dir: Optional[Path] = None, seed: int = 0, v: bool = False, zero_terminal_snr: bool = False):
    from .ldm_host import load_checkpoint
    work_dir = Path(work_dir or os.path.join(os.path.expanduser("~"), ".cache", "lora_trainer", "tiny"))
    name = "tiny-sdxl-v" if v else "tiny-sdxl"
    path = work_dir / f"{name}.safetensors"
    if not path.is_file():
        save_sdxl_checkpoint(work_dir, name, seed, v)
    return load_checkpoint(str(path), device="cpu", zero_terminal_snr=zero_terminal_snr)
