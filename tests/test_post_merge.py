"""merge: LoRAs baked into a checkpoint equal base + Σ ratio·ΔW (the WebUI's way of applying them),
and the merged model's forward equals the base model with the LoRAs applied."""
import json

import pytest
import torch

from lora_trainer import tiny
from lora_trainer.errors import UserError
from lora_trainer.post import merge_lora_into_checkpoint
from test_post_support import load, meta, random_lora, save_net
from webui_rule import merged_the_webui_way


@pytest.fixture(scope="module")
def sd1(sd1_host, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge-sd1")
    ckpt = tiny.save_checkpoint(sd1_host.model, d / "model", "sd1")
    a = random_lora(sd1_host, seed=1)
    b = random_lora(sd1_host, dim=4, alpha=4, conv_dim=2, conv_alpha=2, seed=2, style="ldm")  # LDM-style UNet names
    return ckpt, (a, save_net(a, d / "a.safetensors")), (b, save_net(b, d / "b.safetensors"))


def _forward(host, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    tokens = host.tokenize(["a red circle, simple background"])
    with torch.no_grad():
        cond = host.encode_tokens(tokens)
        return cond, host.unet(x, torch.tensor([500]), context=cond)


def test_merged_layers_equal_base_plus_ratio_times_delta(sd1, sd1_host, tmp_path):
    ckpt, (net_a, a), (net_b, b) = sd1
    out = tmp_path / "merged.safetensors"
    report = merge_lora_into_checkpoint(ckpt, [f"{a}:0.8", (str(b), -0.5)], out)
    assert [(m.unet_modules, m.te_modules) for m in report.loras] == [(117, 12), (117, 12)]
    merged, base = load(out), load(ckpt)
    assert merged.keys() == base.keys()
    with merged_the_webui_way(sd1_host, load(a), 0.8) as un_a, merged_the_webui_way(sd1_host, load(b), -0.5) as un_b:
        assert un_a == [] and un_b == []
        expected = {k: v.detach().clone() for k, v in sd1_host.model.state_dict().items()}
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert len(changed) == report.changed_tensors == 129
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
        if k not in changed:
            assert torch.equal(merged[k], base[k])
    md = json.loads(meta(out)["sd_merge_recipe"])
    assert [(x["name"], x["ratio"]) for x in md["loras"]] == [("a.safetensors", 0.8), ("b.safetensors", -0.5)]
    assert (tmp_path / "merged.yaml").is_file()  # the model config travels with it


def test_merged_model_forward_equals_base_with_loras_applied(sd1, sd1_host, tmp_path):
    from lora_trainer.ldm_host import load_checkpoint
    ckpt, (net_a, a), (net_b, b) = sd1
    out = tmp_path / "m.safetensors"
    merge_lora_into_checkpoint(ckpt, [(a, 0.7), (b, 1.2)], out)
    with net_a.applied_to_model(0.7), net_b.applied_to_model(1.2):
        cond_ref, eps_ref = _forward(sd1_host)
    cond_base, eps_base = _forward(sd1_host)
    cond, eps = _forward(load_checkpoint(str(out)))
    assert (eps_ref - eps_base).abs().max() > 1e-3  # the LoRAs matter
    torch.testing.assert_close(cond, cond_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps, eps_ref, rtol=1e-4, atol=1e-5)


def test_sd2_openclip_attention_rows(sd2v_host, tmp_path):
    ckpt = tiny.save_checkpoint(sd2v_host.model, tmp_path / "model", "sd2-v")
    sd = random_lora(sd2v_host, seed=4).kohya_state_dict()
    lora = save_net(sd, tmp_path / "sd2.safetensors", kind="sd2")
    out = tmp_path / "m.safetensors"
    merge_lora_into_checkpoint(ckpt, [f"{lora}:0.9"], out)
    merged, base = load(out), load(ckpt)
    with merged_the_webui_way(sd2v_host, sd, 0.9, is_sd2=True):
        expected = {k: v.detach().clone() for k, v in sd2v_host.model.state_dict().items()}
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    assert not torch.equal(merged[key], base[key])
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    # without k_proj the WebUI drops that layer's attention LoRA: so does merge, and says so
    partial = {k: v for k, v in sd.items() if not k.startswith("lora_te_text_model_encoder_layers_0_self_attn_k_proj")}
    lora2 = save_net(partial, tmp_path / "partial.safetensors", kind="sd2")
    report = merge_lora_into_checkpoint(ckpt, [lora2], tmp_path / "m2.safetensors")
    assert len(report.loras[0].dropped) == 3 and "skipped 3 OpenCLIP attention parts" in "\n".join(report.lines())
    m2 = load(tmp_path / "m2.safetensors")
    for k in ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
              "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight"):
        assert torch.equal(m2[k], base[k])


def test_bad_inputs_are_refused_and_nothing_is_written(sd1, sd2v_host, tmp_path):
    from safetensors.torch import save_file
    ckpt, (_, a), _ = sd1
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    sd2_sd = random_lora(sd2v_host, seed=9).kohya_state_dict()
    sd2 = save_net(sd2_sd, tmp_path / "sd2.safetensors", kind="sd2")
    sd2_raw = tmp_path / "sd2raw.safetensors"
    save_file({k: v.contiguous() for k, v in sd2_sd.items()}, str(sd2_raw))  # no metadata: the shapes tell
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(a.read_bytes()[:5000])
    out = tmp_path / "out.safetensors"
    cases = [
        (dict(model=ckpt, loras=[a], save_to=existing), "already exists"),
        (dict(model=ckpt, loras=[a], save_to=ckpt), "one of the inputs"),
        (dict(model=ckpt, loras=[sd2], save_to=out), "for SD2 models"),
        (dict(model=ckpt, loras=[sd2_raw], save_to=out), "another model|different model"),
        (dict(model=ckpt, loras=[ckpt], save_to=out), "is a Stable Diffusion checkpoint"),
        (dict(model=a, loras=[a], save_to=out), "is a LoRA, not a checkpoint"),
        (dict(model=ckpt, loras=[cut], save_to=out), "truncated"),
        (dict(model=ckpt, loras=[], save_to=out), "No LoRA given"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            merge_lora_into_checkpoint(kwargs.pop("model"), kwargs.pop("loras"), **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert existing.read_bytes() == b"keep me"


def test_cli_merge(sd1, tmp_path, capsys):
    from lora_trainer.cli import main
    ckpt, (_, a), (_, b) = sd1
    out = tmp_path / "cli.safetensors"
    assert main(["merge", "--model", str(ckpt), "--loras", f"{a}:0.8", f"{b}:0.5", "--save_to", str(out),
                 "--save_precision", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "a.safetensors x 0.8" in text and "129 checkpoint tensors changed" in text
    assert load(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert main(["merge", "--model", str(ckpt), "--loras", str(a), "--save_to", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err



def test_ckpt_input_and_sd_scripts_flags(sd1, tmp_path, capsys):
    """A pickled .ckpt (state_dict inside) is read too; sd-scripts' --sd_model/--models/--ratios work."""
    from lora_trainer.cli import main
    ckpt, (_, a), (_, b) = sd1
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": load(ckpt)}, str(pickled))
    out1, out2 = tmp_path / "from_ckpt.safetensors", tmp_path / "from_st.safetensors"
    assert main(["merge", "--sd_model", str(pickled), "--models", str(a), str(b), "--ratios", "0.8", "0.5",
                 "--save_to", str(out1)]) == 0
    merge_lora_into_checkpoint(ckpt, [(a, 0.8), (b, 0.5)], out2)
    m1, m2 = load(out1), load(out2)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert main(["merge", "--model", str(ckpt), "--models", str(a), "--ratios", "1", "2", "--save_to",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "one ratio per model" in capsys.readouterr().err


def test_algorithm_registry_lets_another_network_type_merge_and_resize(sd1, sd1_host, tmp_path):
    """How a new network type joins: register its key set and ΔW (here a made-up dense "delta_w"; the
    LyCORIS types are registered this way, see test_post_lycoris.py)."""
    from safetensors.torch import save_file
    from lora_trainer.post import resize_lora
    from lora_trainer.post.lora_math import ALGORITHMS, Algorithm, register_algorithm
    ckpt = sd1[0]
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    base = load(ckpt)
    diff = torch.randn(base[key].shape, generator=torch.Generator().manual_seed(0)) * 0.01
    path = tmp_path / "dense.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.delta_w": diff}, str(path), metadata={"ss_v2": "False"})
    with pytest.raises(UserError, match=r"unknown \(delta_w\)"):
        merge_lora_into_checkpoint(ckpt, [path], tmp_path / "a.safetensors")
    register_algorithm(Algorithm("test-dense", frozenset({"delta_w"}), frozenset(), delta=lambda p: p["delta_w"].float(),
                                 shape=lambda p: tuple(p["delta_w"].shape)))
    try:
        merge_lora_into_checkpoint(ckpt, [(path, 0.5)], tmp_path / "b.safetensors")
        torch.testing.assert_close(load(tmp_path / "b.safetensors")[key], base[key] + 0.5 * diff)
        resize_lora(path, tmp_path / "r.safetensors", new_rank=4)  # any ΔW resizes to a plain LoRA
        r = load(tmp_path / "r.safetensors")
        assert r["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    finally:
        ALGORITHMS.pop("test-dense")
