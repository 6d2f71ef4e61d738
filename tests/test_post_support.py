"""Shared helpers of the post-tool tests (random LoRAs on the tiny hosts, an independent ΔW formula),
plus the tests of the pieces every tool stands on: key binding, names, output rules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.io.lora_file import save_lora
from lora_trainer.networks.network import LoRANetwork


# ------------------------------------------------------------------ helpers (imported by test_post_*.py)
def random_lora(host, *, dim=8, alpha=4.0, conv_dim=4, conv_alpha=2.0, seed=0, std=0.05, style="diffusers"):
    """A LoRA network on ``host`` with random (non-zero) lora_up, as if trained."""
    torch.manual_seed(seed)
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=dim, alpha=alpha, conv_dim=conv_dim,
                             conv_alpha=conv_alpha, unet_key_style=style)
    with torch.no_grad():
        for m in net.lora_modules():
            m.lora_up.weight.normal_(0, std)
    return net


def save_net(net_or_sd, path: Path, kind: str = "sd1", precision: str = "float", **meta) -> Path:
    sd = net_or_sd.kohya_state_dict() if isinstance(net_or_sd, LoRANetwork) else net_or_sd
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
          "ss_v2": str(kind == "sd2"), "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2"}[kind],
          "ss_output_name": Path(path).stem, "ss_clip_skip": "1"}
    md.update({k: str(v) for k, v in meta.items()})
    save_lora(Path(path), sd, md, precision)
    return Path(path)


def file_deltas(sd) -> dict:
    """module -> ΔW (float64, 2-D), computed here from the raw tensors: up @ down * alpha / rank."""
    mods = {}
    for k, v in sd.items():
        name, _, part = k.partition(".")
        mods.setdefault(name, {})[part] = v.double()
    out = {}
    for name, w in mods.items():
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        r = down.shape[0]
        out[name] = up.reshape(up.shape[0], -1) @ down.reshape(r, -1) * (float(w["alpha"]) / r)
    return out


def load(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def meta(path):
    from lora_trainer.io.lora_file import read_metadata
    return read_metadata(Path(path))


def state_shapes(host):
    return {k: tuple(v.shape) for k, v in host.model.state_dict().items()}


# ------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("conv", [False, True])
def test_checkpoint_targets_are_the_trainers_names_and_bind_back(kind, conv, sd1_host, sd2v_host):
    """Extract names layers from checkpoint keys alone; merge binds names to keys by the WebUI's
    rules. Both must agree with the trainer's own network on the real (tiny) model."""
    from lora_trainer.post.checkpoint_keys import bind_modules, checkpoint_kind, lora_targets
    host = sd1_host if kind == "sd1" else sd2v_host
    shapes = state_shapes(host)
    assert checkpoint_kind(shapes) == kind
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=4, conv_dim=2 if conv else None)
    targets = lora_targets(shapes, kind, conv)
    assert sorted(t.name for t in targets) == sorted(net._modules)
    bindings, unmatched, dropped = bind_modules(list(net._modules), shapes, kind)
    assert unmatched == [] and dropped == []
    for t in targets:
        assert (bindings[t.name].key, bindings[t.name].rows) == (t.key, t.rows)
    if kind == "sd2":  # q/k/v land on thirds of the fused in_proj_weight
        q = next(t for t in targets if t.name.endswith("layers_0_self_attn_q_proj"))
        assert q.key.endswith("resblocks.0.attn.in_proj_weight") and q.rows == (0, q.shape[0])


def test_openclip_attention_needs_all_four_parts(sd2v_host):
    from lora_trainer.post.checkpoint_keys import bind_modules
    names = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "v", "out")]
    bindings, unmatched, dropped = bind_modules(names, state_shapes(sd2v_host), "sd2")
    assert bindings == {} and unmatched == [] and sorted(dropped) == sorted(names)


def test_parse_weighted_and_output_rules(tmp_path):
    from lora_trainer.post.files import check_output, parse_weighted
    assert parse_weighted("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_weighted("a.safetensors:-1.5") == ("a.safetensors", -1.5)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_weighted(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"x")
    assert check_output(tmp_path / "out", [src]) == tmp_path / "out.safetensors"
    with pytest.raises(UserError, match="one of the inputs"):
        check_output(src, [src], overwrite=True)
    with pytest.raises(UserError, match="already exists"):
        check_output(src, [])
    with pytest.raises(UserError, match=r"\.safetensors only"):
        check_output(tmp_path / "x.ckpt", [])


def test_combine_rank_rule_on_known_singular_values():
    """combine's re-factoring keeps new_rank, never more values than there are (resize's rule, sd-scripts',
    is in test_post_resize_rank.py)."""
    from lora_trainer.post.lora_math import select_rank
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert select_rank(s, 3) == 3
    assert select_rank(s, 8) == 4
    assert select_rank(torch.zeros(4), 8) == 1


def test_lowrank_svd_is_exact():
    from lora_trainer.post.lora_math import lowrank_svd
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    u, s, vh = lowrank_svd(a, b)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, torch.linalg.svdvals(a @ b)[:6], rtol=1e-5, atol=1e-5)
