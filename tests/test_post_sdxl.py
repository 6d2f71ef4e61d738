"""SDXL key layout (conditioner.embedders.0 = CLIP-L, .1 = OpenCLIP with fused attention; LDM-named UNet
LoRA keys, lora_te1/lora_te2) on a small synthetic checkpoint: extract then merge gives the tuned model
back, every LoRA key resolving by the WebUI's rules."""
import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.errors import UserError
from lora_trainer.post import extract_lora, merge_lora_into_checkpoint
from lora_trainer.post.checkpoint_keys import checkpoint_kind, lora_targets
from test_post_support import load, meta, random_lora, save_net

C, T, CTX, E = 16, 24, 32, 8  # UNet channels, time-embedding width, cross-attention context, text width


def sdxl_state_dict(seed=0):
    """The key layout of an SDXL checkpoint (tiny sizes): ResBlocks, a downsampler, SpatialTransformers
    with linear proj_in/out, an upsampler at index 2, both text encoders, norms and embeddings."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    u = "model.diffusion_model."
    shapes[u + "input_blocks.0.0.weight"] = (C, 4, 3, 3)
    shapes[u + "time_embed.0.weight"] = (T, C)
    shapes[u + "label_emb.0.0.weight"] = (T, 12)
    for blk, cin in (("input_blocks.1.0", C), ("input_blocks.4.0", C), ("middle_block.0", 2 * C),
                     ("output_blocks.0.0", 4 * C)):
        cout = C if blk.startswith("input_blocks.1") else 2 * C
        shapes[f"{u}{blk}.in_layers.0.weight"] = (cin,)
        shapes[f"{u}{blk}.in_layers.2.weight"] = (cout, cin, 3, 3)
        shapes[f"{u}{blk}.emb_layers.1.weight"] = (cout, T)
        shapes[f"{u}{blk}.out_layers.3.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"{u}{blk}.skip_connection.weight"] = (cout, cin, 1, 1)
    shapes[u + "input_blocks.3.0.op.weight"] = (C, C, 3, 3)
    for st in ("input_blocks.4.1", "middle_block.1", "output_blocks.0.1"):
        c = 2 * C
        shapes[f"{u}{st}.norm.weight"] = (c,)
        shapes[f"{u}{st}.proj_in.weight"] = (c, c)
        shapes[f"{u}{st}.proj_out.weight"] = (c, c)
        for d in range(2):
            tb = f"{u}{st}.transformer_blocks.{d}."
            for a in ("attn1", "attn2"):
                shapes[tb + f"{a}.to_q.weight"] = (c, c)
                shapes[tb + f"{a}.to_k.weight"] = (c, c if a == "attn1" else CTX)
                shapes[tb + f"{a}.to_v.weight"] = (c, c if a == "attn1" else CTX)
                shapes[tb + f"{a}.to_out.0.weight"] = (c, c)
            shapes[tb + "ff.net.0.proj.weight"] = (8 * c, c)
            shapes[tb + "ff.net.2.weight"] = (c, 4 * c)
            shapes[tb + "norm1.weight"] = (c,)
    shapes[u + "output_blocks.0.2.conv.weight"] = (2 * C, 2 * C, 3, 3)
    shapes[u + "out.2.weight"] = (4, C, 3, 3)
    t1 = "conditioner.embedders.0.transformer.text_model."
    shapes[t1 + "embeddings.token_embedding.weight"] = (50, E)
    shapes[t1 + "final_layer_norm.weight"] = (E,)
    for i in range(2):
        for p in ("q", "k", "v", "out"):
            shapes[f"{t1}encoder.layers.{i}.self_attn.{p}_proj.weight"] = (E, E)
        shapes[f"{t1}encoder.layers.{i}.mlp.fc1.weight"] = (4 * E, E)
        shapes[f"{t1}encoder.layers.{i}.mlp.fc2.weight"] = (E, 4 * E)
    t2 = "conditioner.embedders.1.model."
    shapes[t2 + "token_embedding.weight"] = (50, E)
    shapes[t2 + "text_projection"] = (E, E)
    for i in range(2):
        shapes[f"{t2}transformer.resblocks.{i}.attn.in_proj_weight"] = (3 * E, E)
        shapes[f"{t2}transformer.resblocks.{i}.attn.out_proj.weight"] = (E, E)
        shapes[f"{t2}transformer.resblocks.{i}.mlp.c_fc.weight"] = (4 * E, E)
        shapes[f"{t2}transformer.resblocks.{i}.mlp.c_proj.weight"] = (E, 4 * E)
        shapes[f"{t2}transformer.resblocks.{i}.ln_1.weight"] = (E,)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    base = sdxl_state_dict()
    targets = lora_targets({k: tuple(v.shape) for k, v in base.items()}, "sdxl", conv=True)
    g = torch.Generator().manual_seed(1)
    tuned = {k: v.clone() for k, v in base.items()}
    for t in targets:  # an exactly rank-2 change on every target layer
        w = tuned[t.key]
        view = w[t.rows[0]:t.rows[1]] if t.rows else w
        m = view.reshape(view.shape[0], -1)
        m += (torch.randn(m.shape[0], 2, generator=g) @ torch.randn(2, m.shape[1], generator=g)) * 0.05
    save_file(base, str(d / "base.safetensors"))
    save_file(tuned, str(d / "tuned.safetensors"))
    return d / "base.safetensors", d / "tuned.safetensors", targets


def test_sdxl_names(models):
    base, _, targets = models
    assert checkpoint_kind(load(base)) == "sdxl"
    names = {t.name for t in targets}
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",  # LDM names, as kohya's SDXL
                     "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_1_0_in_layers_2",
                     "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_0_2_conv",
                     "lora_unet_output_blocks_0_0_skip_connection", "lora_unet_output_blocks_0_0_emb_layers_1",
                     "lora_te1_text_model_encoder_layers_1_self_attn_out_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        assert expected in names
    assert not any(("out_2" in n or "time_embed" in n or "label_emb" in n or "input_blocks_0_0" in n or "norm" in n)
                   for n in names)


def test_extract_then_merge_gives_the_tuned_model_back(models, tmp_path):
    base, tuned, targets = models
    lora = tmp_path / "xl.safetensors"
    report = extract_lora(base, tuned, lora, dim=2, conv_dim=2, clamp_quantile=1.0)
    assert report.text_encoder_used and len(report.modules) == len(targets)
    md = meta(lora)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    out = tmp_path / "merged.safetensors"
    r = merge_lora_into_checkpoint(base, [lora], out)
    assert r.kind == "sdxl" and r.loras[0].dropped == []
    assert r.changed_tensors == len({t.key for t in targets})
    merged, want = load(out), load(tuned)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-4, atol=1e-5)


def test_sd1_lora_into_sdxl_is_refused(models, sd1_host, tmp_path):
    base, _, _ = models
    sd1 = save_net(random_lora(sd1_host, seed=3), tmp_path / "sd1.safetensors")
    with pytest.raises(UserError, match="for SD1 models, but base.safetensors is an SDXL checkpoint"):
        merge_lora_into_checkpoint(base, [sd1], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
