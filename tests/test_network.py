import re

import pytest
import torch

from lora_trainer.io.lora_file import load_lora, save_lora
from lora_trainer.networks.naming import resolve_key, unet_diffusers_name, webui_convert_name, webui_layer_names
from lora_trainer.networks.network import LoRANetwork

from webui_rule import merged_the_webui_way


def _randomise(net, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.lora_modules():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std * 4)


from conftest import forward_probe as _forward  # noqa: E402


def test_real_sd1_names_map_like_kohya():
    # the research's worked examples (real SD1 layout), both ways
    assert unet_diffusers_name("input_blocks.5.1.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"
    assert unet_diffusers_name("output_blocks.11.1.proj_out") == "lora_unet_up_blocks_3_attentions_2_proj_out"
    assert unet_diffusers_name("input_blocks.8.0.out_layers.3") == "lora_unet_down_blocks_2_resnets_1_conv2"
    assert unet_diffusers_name("input_blocks.4.0.skip_connection") == "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    assert unet_diffusers_name("middle_block.2.in_layers.2") == "lora_unet_mid_block_resnets_1_conv1"
    assert unet_diffusers_name("input_blocks.3.0.op") == "lora_unet_down_blocks_0_downsamplers_0_conv"
    assert unet_diffusers_name("output_blocks.5.2.conv") == "lora_unet_up_blocks_1_upsamplers_0_conv"
    assert webui_convert_name("lora_unet_up_blocks_0_upsamplers_0_conv", False) == "diffusion_model_output_blocks_2_1_conv"
    assert webui_convert_name("lora_te_text_model_encoder_layers_5_mlp_fc1", True) == \
        "model_transformer_resblocks_5_mlp_c_fc"


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
def test_every_key_resolves_by_the_webui_rule(kind, sd1_host, sd2v_host):
    host = sd1_host if kind == "sd1" else sd2v_host
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    layers = webui_layer_names(host.unet, host.text_encoders)
    names = {k.split(".")[0] for k in net.kohya_state_dict()}
    unresolved = [n for n in names if resolve_key(n, layers, kind == "sd2v") is None]
    assert not unresolved
    assert all("." not in n and re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+", n) for n in names)
    # kohya's diffusers naming where the WebUI's formula fits (it does for the tiny layout)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in names  # LoCon 3x3
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    if kind == "sd2v":  # OpenCLIP attention: all four projections, or the WebUI drops them
        for p in ("q", "k", "v", "out"):
            assert f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj" in names
    # every resolved layer is the module the LoRA adapts
    for m in net.lora_modules():
        layer = resolve_key(m.lora_name, layers, kind == "sd2v")
        target = layers[layer]
        assert target is m.org_module or (isinstance(target, torch.nn.MultiheadAttention) and m.org_module is target)


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
def test_apply_remove_is_exact_and_merge_and_reload_agree(kind, sd1_host, sd2v_host, tmp_path):
    host = sd1_host if kind == "sd1" else sd2v_host
    base_cond, base = _forward(host)
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    # fresh LoRA: up = 0, so applying changes nothing
    net.apply()
    cond0, out0 = _forward(host)
    assert torch.equal(out0, base)
    _randomise(net)
    cond1, with_net = _forward(host)
    assert (with_net - base).abs().max() > 1e-3 and (cond1 - base_cond).abs().max() > 1e-3
    net.remove()
    cond2, after = _forward(host)
    assert torch.equal(after, base) and torch.equal(cond2, base_cond)  # bitwise as before
    assert all("forward" not in m.org_module.__dict__ for m in net.lora_modules())
    # merged ΔW (the WebUI's rule, from the saved file) == forward with the adapter
    path = tmp_path / "x.safetensors"
    save_lora(path, net.kohya_state_dict(), {"ss_network_dim": "4"}, "float")
    sd, meta = load_lora(path)
    with merged_the_webui_way(host, sd) as unmatched:
        assert unmatched == []
        _, merged = _forward(host)
    torch.testing.assert_close(merged, with_net, rtol=1e-4, atol=1e-5)
    _, restored = _forward(host)
    assert torch.equal(restored, base)
    # reloading the file into a fresh network reproduces the forward exactly
    net2 = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    net2.load_kohya_state_dict(sd)
    with net2.applied_to_model():
        _, reloaded = _forward(host)
    assert torch.equal(reloaded, with_net)


def test_multiplier_scales_delta(sd1_host):
    _, base = _forward(sd1_host)
    net = LoRANetwork.create(sd1_host.unet, [], dim=4, alpha=4)
    _randomise(net, std=0.01)
    with net.applied_to_model(multiplier=0.0):
        _, zero = _forward(sd1_host)
    assert torch.equal(zero, base)
    with net.applied_to_model(multiplier=1.0):
        _, one = _forward(sd1_host)
    with net.applied_to_model(multiplier=0.5):
        _, half = _forward(sd1_host)
    assert (one - base).abs().max() > 1e-4
    # a small change is roughly linear in the multiplier
    torch.testing.assert_close(half - base, (one - base) * 0.5, rtol=0.05, atol=1e-4)


def test_load_mismatched_file_is_refused(sd1_host):
    from lora_trainer.errors import UserError
    a = LoRANetwork.create(sd1_host.unet, [], dim=4, alpha=4)
    b = LoRANetwork.create(sd1_host.unet, [], dim=8, alpha=4)
    with pytest.raises(UserError, match="network_dim"):
        b.load_kohya_state_dict(a.kohya_state_dict())
    c = LoRANetwork.create(sd1_host.unet, sd1_host.text_encoders, dim=4, alpha=4)
    with pytest.raises(UserError, match="missing keys"):
        c.load_kohya_state_dict(a.kohya_state_dict())


def test_max_norm_caps_each_module(sd1_host):
    net = LoRANetwork.create(sd1_host.unet, [], dim=4, alpha=4)
    _randomise(net, std=0.5)
    scaled, mean, mx = net.apply_max_norm(0.5)
    assert int(scaled) > 0 and float(mx) <= 0.5 + 1e-5
    for m in net.lora_modules():
        assert float((m.delta_weight()).norm()) <= 0.5 + 1e-4
