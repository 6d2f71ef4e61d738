"""check: the expected zero layer (clip skip) apart from real damage (fp16 underflow, NaN)."""
import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.post import check_lora
from test_post_support import random_lora, save_net

LAST_TE = "lora_te_text_model_encoder_layers_1_"  # the tiny SD1 text encoder has 2 layers


@pytest.fixture(scope="module")
def net_sd(sd1_host):
    return random_lora(sd1_host, seed=5).kohya_state_dict()


def _zero_last_te_layer(sd):
    return {k: (torch.zeros_like(v) if k.startswith(LAST_TE) and "lora_up" in k else v) for k, v in sd.items()}


def test_clip_skip_2_zero_last_layer_is_expected(net_sd, tmp_path):
    path = save_net(_zero_last_te_layer(net_sd), tmp_path / "cs2.safetensors", ss_clip_skip=2)
    r = check_lora(path)
    expected = [m.name for m in r.modules if m.status == "zero-expected"]
    assert len(expected) == 6 and all(n.startswith(LAST_TE) for n in expected)
    assert not r.damaged and r.verdict == "ok"
    text = "\n".join(r.lines())
    assert "at clip skip 2" in text and "Harmless" in text and "verdict: OK" in text
    healthy = next(m for m in r.modules if m.name.startswith("lora_unet_"))
    assert healthy.status == "ok" and healthy.delta_norm > 0 and healthy.rank == 8 and healthy.alpha == 4


def test_same_zeros_at_clip_skip_1_are_damage(net_sd, tmp_path):
    r = check_lora(save_net(_zero_last_te_layer(net_sd), tmp_path / "cs1.safetensors", ss_clip_skip=1))
    assert r.damaged
    assert sum(m.status == "zero" for m in r.modules) == 6
    assert any("zero where training should" in s for s in r.summary)


def test_fp16_underflow_is_named(net_sd, tmp_path):
    # a UNet part trained with tiny updates: its lora_up values fall below fp16's range (~6e-8) and become 0
    sd = {k: (v * 1e-7 if k.startswith("lora_unet_down") and "lora_up" in k else v) for k, v in net_sd.items()}
    r = check_lora(save_net(sd, tmp_path / "fp16.safetensors", precision="fp16", ss_clip_skip=1))
    assert r.damaged and r.dtype == "float16"
    assert {m.name for m in r.modules if m.status == "zero"} == {
        k.split(".")[0] for k in sd if k.startswith("lora_unet_down")}
    text = "\n".join(r.summary)
    assert "fp16 underflow" in text and "bf16" in text
    # the same weights saved as bf16 keep their values: no damage
    assert not check_lora(save_net(sd, tmp_path / "bf16.safetensors", precision="bf16")).damaged


def test_nan_is_damage(net_sd, tmp_path):
    from safetensors.torch import save_file
    sd = dict(net_sd)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path), metadata={"ss_clip_skip": "1"})
    r = check_lora(path)
    assert r.damaged and [m.name for m in r.modules if m.status == "nonfinite"] == [key.split(".")[0]]
    assert any("NaN/Inf" in s for s in r.summary)


def test_sd2_last_layer_unused_even_at_clip_skip_1(sd2v_host, tmp_path):
    sd = random_lora(sd2v_host, seed=6).kohya_state_dict()
    last = "lora_te_text_model_encoder_layers_2_"  # 3 layers, "penultimate" output
    sd = {k: (torch.zeros_like(v) if k.startswith(last) and "lora_up" in k else v) for k, v in sd.items()}
    r = check_lora(save_net(sd, tmp_path / "sd2.safetensors", kind="sd2"))
    assert r.kind == "sd2" and not r.damaged
    assert {m.name for m in r.modules if m.status == "zero-expected"} == {
        n for n in (m.name for m in r.modules) if n.startswith(last)}


def test_not_a_lora_and_truncated(net_sd, tmp_path, sd1_host):
    from safetensors.torch import save_file
    ckpt = tmp_path / "model.safetensors"
    unet = [(k, v) for k, v in sd1_host.model.state_dict().items() if k.startswith("model.diffusion_model.")]
    save_file({k: v.contiguous() for k, v in unet[:5]}, str(ckpt))
    with pytest.raises(UserError, match="checkpoint"):
        check_lora(ckpt)
    good = save_net(net_sd, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        check_lora(cut)
    txt = tmp_path / "notes.safetensors"
    txt.write_text("hello, this is not a model file")
    with pytest.raises(UserError, match="not a safetensors file"):
        check_lora(txt)
