"""extract: a LoRA from (tuned - base) whose every module is the best rank-r approximation of the
difference, named as the trainer names its own modules."""
import pytest
import torch
from safetensors.torch import save_file

from lora_trainer import tiny
from lora_trainer.errors import UserError
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.post import extract_lora
from lora_trainer.post.checkpoint_keys import lora_targets
from test_post_support import file_deltas, load, meta


def _tune(base, targets, te_scale, seed=0):
    """base + a random full-rank change on every target layer (text encoder scaled by te_scale)."""
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v.clone() for k, v in base.items()}
    for t in targets:
        w = tuned[t.key]
        view = w[t.rows[0]:t.rows[1]] if t.rows else w
        view += torch.randn(view.shape, generator=g) * (te_scale if t.is_text_encoder else 0.02)
    return tuned


@pytest.fixture(scope="module")
def sd1(sd1_host, tmp_path_factory):
    d = tmp_path_factory.mktemp("extract-sd1")
    base = tiny.save_checkpoint(sd1_host.model, d, "sd1")
    sd = load(base)
    targets = lora_targets({k: tuple(v.shape) for k, v in sd.items()}, "sd1", conv=True)
    tuned, tuned_same_te = d / "tuned.safetensors", d / "tuned_same_te.safetensors"
    save_file(_tune(sd, targets, 0.02), str(tuned))
    save_file(_tune(sd, targets, 0.001), str(tuned_same_te))  # TE changes below min_diff 0.01
    return base, tuned, tuned_same_te, targets


def assert_best_rank(got, d, r, name=""):
    """Eckart-Young: the best rank-r approximation is the one whose error is sqrt(sum of the other
    singular values squared); no rank-r matrix does better. (Stable even where singular values are close.)"""
    s = torch.linalg.svdvals(d)
    optimum = s[r:].square().sum().sqrt()
    err = (got - d).norm()
    assert torch.linalg.matrix_rank(got) <= r, name
    assert err <= optimum * (1 + 1e-5) + 1e-7 * s[0], (name, float(err), float(optimum))


def _diffs(base, tuned, targets):
    b, t = load(base), load(tuned)
    out = {}
    for x in targets:
        d = (t[x.key] - b[x.key]).double()
        out[x.name] = (d[x.rows[0]:x.rows[1]] if x.rows else d).reshape(d.shape[0] if not x.rows else x.shape[0], -1)
    return out


def test_extracted_modules_are_the_best_rank_r_approximation(sd1, sd1_host, tmp_path):
    base, tuned, _, targets = sd1
    out = tmp_path / "x.safetensors"
    report = extract_lora(base, tuned, out, dim=3, conv_dim=2, clamp_quantile=1.0)
    sd = load(out)
    got = file_deltas(sd)
    # the same module names as a LoCon the trainer would create on this model
    net = LoRANetwork.create(sd1_host.unet, sd1_host.text_encoders, dim=3, alpha=3, conv_dim=2)
    assert sorted(got) == sorted(net._modules)
    for name, d in _diffs(base, tuned, targets).items():
        conv3 = sd[f"{name}.lora_down.weight"].dim() == 4 and sd[f"{name}.lora_down.weight"].shape[-1] == 3
        r = 2 if conv3 else 3
        assert sd[f"{name}.lora_down.weight"].shape[0] == r and float(sd[f"{name}.alpha"]) == r
        assert_best_rank(got[name], d, r, name)
    assert report.text_encoder_used and report.text_encoder_max_diff > 0.01
    md = meta(out)
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3.0" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_output_name"] == "x"


def test_default_clamp_and_text_encoder_skip(sd1, tmp_path):
    base, tuned, tuned_same_te, targets = sd1
    out = tmp_path / "c.safetensors"
    report = extract_lora(base, tuned_same_te, out, dim=3)  # clamp 0.99, min_diff 0.01, no conv_dim
    sd = load(out)
    assert not report.text_encoder_used and not any(k.startswith("lora_te") for k in sd)
    assert not any("resnets" in k or "samplers" in k for k in sd)  # no conv_dim: transformer blocks only
    assert "text encoder left out" in "\n".join(report.lines())
    diffs = _diffs(base, tuned_same_te, targets)
    clamped = 0
    for name, got in file_deltas(sd).items():
        d = diffs[name]
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        err = (got - best).norm() / best.norm()
        assert err < 0.5  # clamping the top 1 % of factor values (sd-scripts' default) costs some accuracy ...
        clamped += err > 1e-6  # ... but does change something
        values = torch.cat([sd[f"{name}.lora_up.weight"].flatten(), sd[f"{name}.lora_down.weight"].flatten()]).abs()
        assert int((values == values.max()).sum()) >= 2  # the largest values sit at the clamp bound
    assert clamped > 0


def test_sd2_qkv_rows(sd2v_host, tmp_path):
    base = tiny.save_checkpoint(sd2v_host.model, tmp_path, "sd2-v")
    sd = load(base)
    targets = lora_targets({k: tuple(v.shape) for k, v in sd.items()}, "sd2", conv=False)
    tuned = tmp_path / "tuned.safetensors"
    save_file(_tune(sd, targets, 0.05, seed=1), str(tuned))
    out = tmp_path / "x.safetensors"
    extract_lora(base, tuned, out, dim=2, clamp_quantile=1.0)
    got = file_deltas(load(out))
    assert meta(out)["ss_v2"] == "True"
    for name, d in _diffs(base, tuned, targets).items():
        assert_best_rank(got[name], d, 2, name)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in got


def test_extract_refuses_mismatched_models(sd1, sd2v_host, tmp_path):
    base, tuned, _, _ = sd1
    sd2 = tiny.save_checkpoint(sd2v_host.model, tmp_path / "sd2", "sd2-v")
    with pytest.raises(UserError, match="fine-tune"):
        extract_lora(base, sd2, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="same file"):
        extract_lora(base, base, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="do not differ"):
        copy = tmp_path / "copy.safetensors"
        copy.write_bytes(base.read_bytes())
        extract_lora(base, copy, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
