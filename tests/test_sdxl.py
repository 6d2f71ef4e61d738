"""SDXL: the CLI's model code (diffusers' UNet in sgm's names, CLIP-L, OpenCLIP bigG, the LDM VAE) on a
tiny random single-file checkpoint in the sgm layout, and on the full-size architecture (meta tensors:
names and shapes, no memory); conditioning; training; cached text-encoder outputs; file names."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from lora_trainer.dataset.buckets import size_conditioning  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.io.lora_file import load_lora  # noqa: E402
from lora_trainer.networks.naming import resolve_key, webui_layer_names  # noqa: E402
from lora_trainer.networks.network import LoRANetwork  # noqa: E402
from lora_trainer.run import build_data, train  # noqa: E402
from lora_trainer.train.validation import validation_loss  # noqa: E402

from conftest import state_hash  # noqa: E402

# Facts about real SDXL base 1.0 files: UNet keys of sd_xl_base_1.0.safetensors (model.diffusion_model.*)
# and shapes, and the module names sd-scripts' networks/lora.py writes for SDXL (sdxl_train_network.py
# logs "create LoRA for Text Encoder 1: 72 modules", "... 2: 192 modules", "create LoRA for U-Net: 722").
SDXL_UNET_KEYS = 1680
SDXL_UNET_SHAPES = {
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "time_embed.0.weight": (1280, 320),
    "label_emb.0.0.weight": (1280, 2816),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.4.1.proj_in.weight": (640, 640),
    "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "middle_block.2.emb_layers.1.weight": (1280, 1280),
    "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "out.2.weight": (4, 320, 3, 3),
}
SD_SCRIPTS_SDXL_NAMES = [
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
    "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj",
    "lora_unet_output_blocks_5_1_proj_out",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_11_mlp_fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1",
]
SD_SCRIPTS_SDXL_CONV_NAMES = [  # with conv_dim (LoCon): ResBlocks, down- and upsamplers
    "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
]


def _full_size_modules():
    from transformers import CLIPTextConfig, CLIPTextModel
    from lora_trainer.sdxl_text import CLIPLEmbedder, OpenCLIPGEmbedder, OpenCLIPTextTower
    from lora_trainer.sdxl_unet import SDXL_BASE_UNET, build_unet
    with torch.device("meta"):
        unet = build_unet(SDXL_BASE_UNET, device="meta")
        te1 = CLIPLEmbedder(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, projection_dim=768)), None)
        te2 = OpenCLIPGEmbedder(OpenCLIPTextTower(1280, 32, 20, 1280))
    return unet, te1, te2


def test_full_size_sdxl_layout_and_sd_scripts_names():
    unet, te1, te2 = _full_size_modules()
    sd = unet.state_dict()
    assert len(sd) == SDXL_UNET_KEYS
    for k, shape in SDXL_UNET_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    # the same parameter objects as diffusers' model: the view copies nothing
    assert {id(p) for p in unet.parameters()} == {id(p) for p in unet.diffusers_unet.parameters()}
    te = [("lora_te1", te1), ("lora_te2", te2)]
    with torch.device("meta"):
        net = LoRANetwork.create(unet, te, dim=4, alpha=1, unet_key_style="ldm")
        locon = LoRANetwork.create(unet, [], dim=4, alpha=1, conv_dim=4, conv_alpha=1, unet_key_style="ldm")
    assert len(net.unet_names) == 722
    assert sum(n.startswith("lora_te1_") for n in net.te_names) == 72
    te2_modules = {k.split(".")[0] for k in net.state_dict() if k.startswith("lora_te2_")}
    assert len(te2_modules) == 192, len(te2_modules)
    file_names = {k.split(".")[0] for k in net.state_dict()}
    missing = [n for n in SD_SCRIPTS_SDXL_NAMES if n not in file_names]
    assert not missing, missing
    conv_names = {k.split(".")[0] for k in locon.state_dict()}
    assert not [n for n in SD_SCRIPTS_SDXL_CONV_NAMES if n not in conv_names]
    layers = webui_layer_names(unet, [(p, te) for p, te in te])
    assert not [n for n in file_names | conv_names if resolve_key(n, layers, False) is None]


def test_checkpoint_layout_is_checked(tmp_path, sdxl_host):
    """A checkpoint whose UNet does not fit is refused with the key that differs, not a traceback."""
    from safetensors.torch import load_file, save_file
    from lora_trainer import tiny
    from lora_trainer.errors import UserError
    from lora_trainer.ldm_host import load_checkpoint
    src = tiny.save_sdxl_checkpoint(tmp_path, "x")
    sd = load_file(str(src))
    sd.pop("model.diffusion_model.input_blocks.4.1.proj_in.weight")
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="input_blocks.4.1.proj_in.weight"):
        load_checkpoint(str(tmp_path / "x.safetensors"))


def test_conditioning_shapes_and_size_embedding(sdxl_host):
    h = sdxl_host
    tok = h.tokenize(["trigger_a, red circle", "a blue square"], 150)
    assert tok[0].shape == (2, 2, 77) and tok[1].shape == (2, 2, 77)
    cond = h.encode_tokens(tok)
    # crossattn: CLIP-L (32) and bigG (32) side by side, two 77-token chunks; pooled: bigG's projection
    assert cond["crossattn"].shape == (2, 154, 64) and cond["pooled"].shape == (2, 32)
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        a = h.denoise(z, t, dict(cond, time_ids=torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)))
        b = h.denoise(z, t, dict(cond, time_ids=torch.tensor([[128., 96, 16, 0, 64, 64]] * 2)))
        c = h.denoise(z, t, cond)   # no time_ids: the latents' size, as at generation
    assert (a - b).abs().max() > 1e-4      # size conditioning reaches the UNet
    torch.testing.assert_close(a, c)
    # the vector diffusers builds is SDXL's 2816-wide one scaled down: pooled + 3 x (2 x 256)
    assert h.unet.label_emb[0][0].in_features == 32 + 6 * 256


def test_size_conditioning_follows_the_crop():
    # a 96x64 image in a 64x64 bucket: scaled to cover (96x64), centre-cropped 16 px from the left
    assert size_conditioning((96, 64), (64, 64)) == (64, 96, 0, 16, 64, 64)
    # a 100x300 image in a 64x192 bucket: scaled by 0.64 to 64x192, no crop
    assert size_conditioning((100, 300), (64, 192)) == (300, 100, 0, 0, 192, 64)


def _val(host, cfg, network=None):
    data = build_data(cfg)
    data.cache_latents(host.encode_images, "", False)
    return validation_loss(host, data.latents, [it.caption for it in data.items],
                           max_token_length=cfg.max_token_length, network=network)


@pytest.mark.parametrize("kind", ["eps", "v-ztsnr"])
def test_sdxl_training_lowers_fixed_seed_validation_loss(kind, sdxl_host, sdxlv_host, tiny_cfg):
    host = sdxl_host if kind == "eps" else sdxlv_host
    assert host.prediction_type == ("epsilon" if kind == "eps" else "v")
    # LoCon: the tiny SDXL has attention at one level only, like SDXL none at the first
    cfg = tiny_cfg.replace(max_train_epochs=4, learning_rate=2e-3, text_encoder_lr=1e-3, network_dim=8,
                           network_alpha=8.0, network_args=["conv_dim=8", "conv_alpha=8"])
    before_hash = state_hash(host)
    before = _val(host, cfg)
    after = {}
    result = train(cfg, host, before_restore=lambda net: after.setdefault("v", _val(host, cfg, net)))
    assert after["v"] < before * 0.97, (before, after)
    assert state_hash(host) == before_hash
    sd, meta = load_lora(result.final_file)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.prediction_type"] == ("epsilon" if kind == "eps" else "v")
    assert meta["ss_zero_terminal_snr"] == ("False" if kind == "eps" else "True")
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in sd}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    layers = webui_layer_names(host.unet, host.text_encoders)
    assert not [k for k in {k.split(".")[0] for k in sd} if resolve_key(k, layers, False) is None]


def test_zero_terminal_snr_schedule(sdxlv_host):
    acp = sdxlv_host.alphas_cumprod
    assert acp[-1] < 1e-7 and abs(acp[0].item() - (1 - 0.00085)) < 1e-6
    assert torch.all(acp[1:] < acp[:-1])


def test_cached_text_encoder_outputs_equal_recomputed(sdxl_host, sd1_host):
    from lora_trainer.train.text_cache import TextEncoderCache
    import contextlib
    caps = ["trigger_a, red circle, simple background", "trigger_b, blue square", "", "trigger_a, red circle, simple background"]
    for host in (sdxl_host, sd1_host):
        cache = TextEncoderCache(host, max_token_length=150, clip_skip=1, autocast=contextlib.nullcontext)
        got = cache.encode(caps)
        with torch.no_grad():
            want = host.encode_tokens(host.tokenize(caps, 150), 1)
        assert cache.computed == 3          # each distinct caption once
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), k
        else:
            assert torch.equal(got, want)


def test_unet_only_run_with_cached_text_outputs_and_shuffled_captions(sdxl_host, tiny_cfg):
    h = state_hash(sdxl_host)
    r1 = train(tiny_cfg.replace(network_train_unet_only=True, cache_text_encoder_outputs=True,
                                shuffle_caption=False, output_name="c", max_train_epochs=1), sdxl_host)
    r2 = train(tiny_cfg.replace(network_train_unet_only=True, cache_text_encoder_outputs=False,
                                shuffle_caption=False, output_name="n", max_train_epochs=1), sdxl_host)
    r3 = train(tiny_cfg.replace(network_train_unet_only=True, cache_text_encoder_outputs=True,
                                shuffle_caption=True, keep_tokens=1, output_name="s", max_train_epochs=2), sdxl_host)
    a, b = load_lora(r1.final_file)[0], load_lora(r2.final_file)[0]
    assert a.keys() == b.keys() and all(k.startswith("lora_unet_") for k in a)
    # the cached run trains as the uncached one: the same losses step by step (batched encoding differs
    # in the last bits, which Adam's normalised first steps can amplify in single weights, so compare losses)
    la, lb = [l for _, l in r1.step_losses], [l for _, l in r2.step_losses]
    assert len(la) == len(lb) >= 2
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-6)
    assert r3.final_file.is_file() and len(r3.epoch_losses) == 2
    assert state_hash(sdxl_host) == h


def test_cache_needs_frozen_text_encoders(tiny_cfg):
    from lora_trainer.errors import ConfigError
    with pytest.raises(ConfigError, match="network_train_unet_only"):
        tiny_cfg.replace(cache_text_encoder_outputs=True).validate()


def test_cli_trains_a_single_file_sdxl_checkpoint(tmp_path, dataset_dir):
    """``python -m lora_trainer train`` on an SDXL .safetensors + its sgm yaml: kohya SDXL keys, SDXL metadata."""
    from lora_trainer import tiny
    from lora_trainer.cli import main
    ckpt = tiny.save_sdxl_checkpoint(tmp_path / "model", "my-sdxl")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("\n".join([
        f'pretrained_model_name_or_path = "{ckpt}"', f'train_data_dir = "{dataset_dir}"',
        f'output_dir = "{tmp_path / "out"}"', 'output_name = "xl"', 'resolution = "64"', "min_bucket_reso = 64",
        "max_bucket_reso = 128", "network_dim = 4", "network_alpha = 2", "max_train_epochs = 1",
        "train_batch_size = 2", 'mixed_precision = "no"', "max_token_length = 75",
        "network_train_unet_only = true", "cache_text_encoder_outputs = true", 'network_args = ["conv_dim=2"]']))
    assert main(["train", "--config", str(cfg)]) == 0
    sd, meta = load_lora(tmp_path / "out" / "xl.safetensors")
    names = {k.split(".")[0] for k in sd}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2"}


@pytest.mark.parametrize("module", ["networks.lora", "networks.dylora"])
def test_lora_forward_equals_the_file_merged_the_webui_way(module, sdxl_host):
    """LoRA/LoCon (both text encoders: bigG's attention as q/k/v/out merged into in_proj) and DyLoRA."""
    from conftest import forward_probe
    from webui_rule import merged_the_webui_way
    from lora_trainer.networks import dylora
    host = sdxl_host
    host.prepare()
    try:
        if module == "networks.lora":
            net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                                     unet_key_style="ldm")
        else:
            with pytest.raises(UserError, match="network_train_unet_only"):   # bigG's fused attention
                dylora.create(host.unet, host.text_encoders, dim=4, alpha=2, network_args={"unit": 2})
            net = dylora.create(host.unet, host.text_encoders[:1], dim=4, alpha=2, network_args={"unit": 2},
                                unet_key_style="ldm")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        c0, y0 = forward_probe(host)
        net.eval()
        net.apply()
        c1, y1 = forward_probe(host)
        net.remove()
        assert (y1 - y0).abs().max() > 1e-3 and (c1 - c0).abs().max() > 1e-3
        sd = net.kohya_state_dict()
        assert any(k.startswith("lora_te2_" if module == "networks.lora" else "lora_te1_") for k in sd)
        with merged_the_webui_way(host, sd, is_sd2=False) as unmatched:
            c2, y2 = forward_probe(host)
        assert not unmatched
        torch.testing.assert_close(c2, c1, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(y2, y1, rtol=1e-4, atol=2e-5)
        c3, y3 = forward_probe(host)
        assert torch.equal(y3, y0) and torch.equal(c3, c0)
    finally:
        host.restore()


def test_text_cache_keeps_at_most_max_entries(sd1_host):
    import contextlib
    from lora_trainer.train.text_cache import TextEncoderCache
    cache = TextEncoderCache(sd1_host, max_token_length=75, clip_skip=1, autocast=contextlib.nullcontext,
                             store_device="cpu", max_entries=2)
    a = cache.encode(["a, b", "c, d"])
    cache.encode(["e, f"])                       # "a, b" was the least recently used: dropped
    assert len(cache) == 2 and "a, b" not in cache.entries and cache.computed == 3
    again = cache.encode(["a, b", "c, d"])       # recomputed, and equal
    assert cache.computed == 4 and torch.equal(again, a)
