"""The post tools on LyCORIS files (LoHa, LoKr, LoCon with CP, IA3, full/diff, OFT/BOFT, DoRA, norm),
made by the trainer's own LyCORIS networks on the tiny SD1 model with random weights (alpha != dim,
so a scale applied twice shows).

The reference is the WebUI's rule (lora_trainer.networks.webui_math, written from its network_*.py):
merge must equal the file applied that way; resize and combine must give plain LoRAs whose ΔW, by
the same rule, is the input's (or its best approximation at the rank asked for)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lycoris")

from lora_trainer import tiny  # noqa: E402
from lora_trainer.config import parse_value  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.io.lora_file import save_lora  # noqa: E402
from lora_trainer.networks.lycoris_adapter import LycorisNetwork  # noqa: E402
from lora_trainer.networks.naming import resolve_key, webui_layer_names  # noqa: E402
from lora_trainer.networks.webui_math import group_modules, merged_into, updown  # noqa: E402
from lora_trainer.post import check_lora, combine_loras, merge_lora_into_checkpoint, resize_lora  # noqa: E402
from test_post_support import load, meta, random_lora, save_net  # noqa: E402

CASES = {
    "loha": ["algo=loha", "conv_dim=2", "conv_alpha=1"],
    "loha-cp": ["algo=loha", "use_cp=True", "conv_dim=2", "conv_alpha=1"],
    "lokr": ["algo=lokr", "factor=4", "conv_dim=2", "conv_alpha=1"],
    "lokr-cp": ["algo=lokr", "factor=8", "decompose_both=True", "use_cp=True", "conv_dim=2", "conv_alpha=1"],
    "lora-cp": ["algo=lora", "use_cp=True", "conv_dim=2", "conv_alpha=1"],
    "ia3": ["algo=ia3", "preset=ia3"],
    "full": ["algo=full"],
    "diag-oft": ["algo=diag-oft", "constraint=0.01", "rescaled=True"],
    "boft": ["algo=boft"],
    "dora": ["algo=loha", "dora_wd=True"],
    "lora-dora": ["algo=lora", "dora_wd=True", "conv_dim=2", "conv_alpha=1"],
    "lokr-dora": ["algo=lokr", "factor=4", "dora_wd=True"],
    "norm": ["algo=lokr", "factor=4", "train_norm=True"],
}


def _args(items):
    return {k: parse_value(v) for k, v in (a.split("=", 1) for a in items)}


@pytest.fixture(scope="module")
def made(sd1_host, tmp_path_factory):
    """The tiny SD1 checkpoint and one saved file per case: {case: (path, state dict)}."""
    d = tmp_path_factory.mktemp("post-lycoris")
    ckpt = tiny.save_checkpoint(sd1_host.model, d / "model", "sd1")
    files = {}
    g = torch.Generator().manual_seed(7)
    for case, args in CASES.items():
        net = LycorisNetwork.create(sd1_host.unet, sd1_host.text_encoders, dim=4, alpha=2, network_args=_args(args))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        sd = {k: v.detach().clone() for k, v in net.kohya_state_dict().items()}
        path = d / f"{case}.safetensors"
        save_lora(path, sd, {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
                             "ss_network_args": json.dumps(_args(args)), "ss_v2": "False",
                             "ss_base_model_version": "sd_v1", "ss_output_name": case, "ss_clip_skip": "1"}, "float")
        files[case] = (path, sd)
    return ckpt, files


def _webui_deltas(host, sd):
    """WebUI layer -> (ΔW, Δbias or None) of a file, by the WebUI's rule on the host's weights."""
    layers = webui_layer_names(host.unet, host.text_encoders)
    out = {}
    with torch.no_grad():
        for name, w in group_modules(sd).items():
            layer = resolve_key(name, layers, False)
            assert layer is not None, name
            out[layer] = updown(w, layers[layer].weight)
    return out


def _close(got, want, rel=1e-5):
    """Equal up to float32 SVD rounding: relative Frobenius error (an element-wise bound is too tight
    for small entries of a re-factored ΔW)."""
    assert got.shape == want.shape
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))
    assert err <= rel, err


def _model_state(host):
    return {k: v.detach().clone() for k, v in host.model.state_dict().items()}


# ------------------------------------------------------------------ merge
@pytest.mark.parametrize("pair", [("loha", "lokr"), ("loha-cp", "lokr-cp"), ("lora-cp", "full"), ("ia3", "diag-oft"),
                                  ("boft", "dora"), ("lora-dora", "lokr-dora"), ("norm", "loha")])
def test_merge_equals_base_plus_ratio_times_webui_delta(pair, made, sd1_host, tmp_path):
    """Two files at 0.8 and -0.5: the merged checkpoint is what the WebUI computes with both loaded
    (IA3/OFT/DoRA relative to the weight as the file before left it, as the WebUI applies them in turn)."""
    ckpt, files = made
    (a, sd_a), (b, sd_b) = files[pair[0]], files[pair[1]]
    out = tmp_path / "merged.safetensors"
    report = merge_lora_into_checkpoint(ckpt, [f"{a}:0.8", (str(b), -0.5)], out)
    base, merged = load(ckpt), load(out)
    with merged_into(sd1_host.unet, sd1_host.text_encoders, sd_a, 0.8) as un_a, \
            merged_into(sd1_host.unet, sd1_host.text_encoders, sd_b, -0.5) as un_b:
        assert un_a == [] and un_b == []
        expected = _model_state(sd1_host)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert len(changed) == report.changed_tensors and len(changed) >= 30
    assert changed == {k for k in base if not torch.equal(base[k], expected[k])}
    for k in changed:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    if "full" in pair or "norm" in pair:  # diff_b / b_norm went into biases
        assert any(k.endswith(".bias") for k in changed)
    text = "\n".join(report.lines())
    assert all(f"{p}.safetensors x" in text for p in pair)


def test_merge_refuses_what_it_cannot_match(made, tmp_path):
    ckpt, files = made
    base = load(ckpt)
    before = set(tmp_path.iterdir())
    # IA3 for other layer sizes: found only when ΔW meets the weight; still nothing is written
    sd = {k: (torch.ones(7) if k.endswith(".weight") else v) for k, v in files["ia3"][1].items()}
    bad = save_net(sd, tmp_path / "ia3-bad.safetensors")
    with pytest.raises(UserError, match="does not fit"):
        merge_lora_into_checkpoint(ckpt, [bad], tmp_path / "x.safetensors")
    # DoRA with a per-output magnitude (wd_on_output): the WebUI misapplies it; refused with the fix
    sd = {}
    for name, w in group_modules(files["dora"][1]).items():
        ds = w["dora_scale"]  # (1, in[, 1, 1]) -> (out, 1[, 1, 1])
        w = dict(w, dora_scale=torch.full((w["hada_w1_a"].shape[0], 1) + tuple(ds.shape[2:]), float(ds.mean())))
        sd.update({f"{name}.{part}": t for part, t in w.items()})
    wd = save_net(sd, tmp_path / "wd.safetensors")
    with pytest.raises(UserError, match=r"wd.safetensors: module lora_\w+: dora_scale .* wd_on_output=False"):
        merge_lora_into_checkpoint(ckpt, [wd], tmp_path / "y.safetensors")
    # a type no tool knows (GLoRA): named, nothing written
    glora = save_net({"lora_unet_time_embed_0.a1.weight": torch.ones(32, 2), "lora_unet_time_embed_0.a2.weight":
                      torch.ones(2, 32), "lora_unet_time_embed_0.b1.weight": torch.ones(128, 2),
                      "lora_unet_time_embed_0.b2.weight": torch.ones(2, 32)}, tmp_path / "g.safetensors")
    with pytest.raises(UserError, match="does not handle.*Known types: .*LoHa"):
        merge_lora_into_checkpoint(ckpt, [glora], tmp_path / "z.safetensors")
    assert set(tmp_path.iterdir()) - before == {bad, wd, glora}
    assert load(ckpt).keys() == base.keys()


# ------------------------------------------------------------------ check
def test_check_reports_every_type(made, tmp_path):
    from safetensors.torch import save_file
    _, files = made
    for case in ("loha", "lokr-cp", "full", "ia3", "boft", "dora", "norm"):
        r = check_lora(files[case][0])
        assert r.verdict == "ok" and all(m.status == "ok" for m in r.modules), (case, r.lines())
        assert "unknown" not in {m.algo for m in r.modules}
        weighted = case in ("ia3", "boft", "dora")
        assert all((m.delta_norm is None) == weighted for m in r.modules), case
        if not weighted:
            assert all(m.delta_norm > 0 for m in r.modules)
    loha = check_lora(files["loha"][0])
    assert {m.rank for m in loha.modules} == {4, 2} and {m.algo for m in loha.modules} == {"loha"}
    assert "LoHa" in "\n".join(loha.summary)
    # damage in LyCORIS tensors: a zero LoHa factor, NaN in a LoKr factor, a zero IA3 vector
    name = next(iter(group_modules(files["loha"][1])))
    sd = {k: (torch.zeros_like(v) if k == f"{name}.hada_w2_a" else v) for k, v in files["loha"][1].items()}
    r = check_lora(save_net(sd, tmp_path / "loha0.safetensors"))
    assert r.damaged and [m.name for m in r.modules if m.status == "zero"] == [name]
    assert "hada_w2_a all zero" in next(m.note for m in r.modules if m.name == name)
    sd = dict(files["lokr"][1])
    key = next(k for k in sd if k.endswith(".lokr_w1"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "lokr-nan.safetensors"))  # not save_lora
    r = check_lora(tmp_path / "lokr-nan.safetensors")
    assert r.damaged and [m.status for m in r.modules if m.name == key.split(".")[0]] == ["nonfinite"]
    sd = dict(files["ia3"][1])
    key = next(k for k in sd if k.endswith(".weight"))
    sd[key] = torch.zeros_like(sd[key])
    r = check_lora(save_net(sd, tmp_path / "ia3-0.safetensors"))
    assert r.damaged and [m.name for m in r.modules if m.status == "zero"] == [key.split(".")[0]]
    # a zero bias change alone (diff_b) is no damage; a zero diff with it is
    sd = {k: (torch.zeros_like(v) if k.endswith("diff_b") else v) for k, v in files["full"][1].items()}
    assert not check_lora(save_net(sd, tmp_path / "full-b0.safetensors")).damaged


# ------------------------------------------------------------------ resize
def _layer_shapes(host):
    return {k: tuple(m.weight.shape) for k, m in webui_layer_names(host.unet, host.text_encoders).items()
            if hasattr(m, "weight") and m.weight is not None}


@pytest.mark.parametrize("case", ["loha", "lokr", "lora-cp", "full", "norm"])
def test_resize_turns_lycoris_into_the_best_plain_lora(case, made, sd1_host, tmp_path):
    _, files = made
    path, sd = files[case]
    report = resize_lora(path, tmp_path / "r.safetensors", new_rank=2)
    out = load(tmp_path / "r.safetensors")
    md = meta(tmp_path / "r.safetensors")
    assert md["ss_network_module"] == "networks.lora" and "ss_network_args" not in md
    assert "converted" in md["ss_training_comment"]
    text = "\n".join(report.lines())
    assert "converted to a plain LoRA" in text and "networks.lora" in text
    want, got = _webui_deltas(sd1_host, sd), _webui_deltas(sd1_host, out)
    assert want.keys() == got.keys()
    layers = _layer_shapes(sd1_host)
    for layer, (d_in, _) in want.items():
        d_out = got[layer][0]
        if d_in.dim() == 1:  # norm modules are copied
            torch.testing.assert_close(d_out, d_in)
            continue
        down = out[next(k for k in out if k.endswith(".lora_down.weight") and resolve_key(
            k.split(".")[0], layers, False) == layer)]
        assert down.dim() == len(layers[layer]) and tuple(down.shape[1:]) == layers[layer][1:]  # kernel restored
        s = torch.linalg.svdvals(d_in.reshape(d_in.shape[0], -1).double())
        err = (d_out - d_in).reshape(d_in.shape[0], -1).double().norm()
        assert abs(float(err) - float(s[2:].norm())) <= 1e-4 * float(s.norm()) + 1e-6, layer  # Eckart-Young
    if case == "full":
        assert "bias" in text and "left out" in text
    if case == "norm":
        assert "norm modules" in text and any(k.endswith(".w_norm") for k in out)


def test_resize_at_full_rank_is_exact_and_refuses_weight_dependent_types(made, sd1_host, tmp_path, capsys):
    from lora_trainer.cli import main
    _, files = made
    path, sd = files["lokr-cp"]
    assert main(["resize", "--model", str(path), "--save_to", str(tmp_path / "r.safetensors"), "--new_rank", "512",
                 "-q"]) == 0
    assert "LoKr modules re-factored by SVD" in capsys.readouterr().out
    want, got = _webui_deltas(sd1_host, sd), _webui_deltas(sd1_host, load(tmp_path / "r.safetensors"))
    for layer, (d, _) in want.items():
        _close(got[layer][0], d)
    for case, label in (("ia3", "IA3"), ("diag-oft", "OFT"), ("dora", "DoRA")):
        with pytest.raises(UserError, match=f"{label}.*merge.*extract"):
            resize_lora(files[case][0], tmp_path / f"{case}.safetensors", new_rank=2)
        assert not (tmp_path / f"{case}.safetensors").exists()


# ------------------------------------------------------------------ combine
def test_combine_lycoris(made, sd1_host, tmp_path):
    _, files = made
    (loha, sd_loha), (cp, sd_cp) = files["loha"], files["lora-cp"]
    plain = random_lora(sd1_host, dim=4, alpha=2, conv_dim=2, conv_alpha=1, seed=3).kohya_state_dict()
    plain_path = save_net(plain, tmp_path / "plain.safetensors")
    # LoHa cannot be stacked: refused without new_rank, nothing written
    with pytest.raises(UserError, match="LoHa.*new_rank"):
        combine_loras([loha, plain_path], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    for case in ("ia3", "dora"):
        with pytest.raises(UserError, match="merge.*extract"):
            combine_loras([plain_path, files[case][0]], tmp_path / "x.safetensors", new_rank=4)

    def expected(*pairs):
        total = {}
        for sd, ratio in pairs:
            for layer, (d, _) in _webui_deltas(sd1_host, sd).items():
                total[layer] = total.get(layer, 0) + d * ratio
        return total

    # LoHa + plain LoRA re-factored at a rank that holds everything: exact, and a plain LoRA
    report = combine_loras([f"{loha}:1", f"{plain_path}:-0.5"], tmp_path / "c.safetensors", new_rank=512)
    got = _webui_deltas(sd1_host, load(tmp_path / "c.safetensors"))
    want = expected((sd_loha, 1.0), (plain, -0.5))
    assert got.keys() == want.keys()
    for layer, d in want.items():
        _close(got[layer][0], d)
    assert meta(tmp_path / "c.safetensors")["ss_network_module"] == "networks.lora"
    assert "LoHa modules were re-factored by SVD" in "\n".join(report.lines())
    # LoCon with a CP core has up/down factors: concatenated exactly, no new_rank needed
    combine_loras([f"{cp}:0.7", f"{plain_path}:1"], tmp_path / "cp.safetensors")
    got = _webui_deltas(sd1_host, load(tmp_path / "cp.safetensors"))
    for layer, d in expected((sd_cp, 0.7), (plain, 1.0)).items():
        torch.testing.assert_close(got[layer][0], d, rtol=1e-5, atol=1e-7)  # no SVD: exact up to rounding
    # norm modules add up and stay norm modules
    norm, sd_norm = files["norm"]
    combine_loras([f"{norm}:0.5", f"{norm}:0.25"], tmp_path / "n.safetensors", new_rank=512)
    got = _webui_deltas(sd1_host, load(tmp_path / "n.safetensors"))
    for layer, (d, b) in _webui_deltas(sd1_host, sd_norm).items():
        _close(got[layer][0], d * 0.75)
        if b is not None:
            torch.testing.assert_close(got[layer][1], b * 0.75)


# ------------------------------------------------------------------ SDXL (LDM-named UNet, two text encoders)
def test_sdxl_loha_merge_and_resize(tmp_path):
    """A LoHa on the SDXL key layout, conv factors flattened as LyCORIS saves them: merge equals the
    WebUI's rule on each weight; resize at full rank gives the same checkpoint back, with the conv
    kernels restored from the LDM names (proj_in stays Linear on SDXL)."""
    from safetensors.torch import save_file
    from lora_trainer.post.checkpoint_keys import lora_targets
    from test_post_sdxl import sdxl_state_dict
    base = sdxl_state_dict()
    save_file(base, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(3)
    sd, keys = {}, {}
    for t in lora_targets({k: tuple(v.shape) for k, v in base.items()}, "sdxl", conv=True):
        if t.key.endswith((".in_proj_weight", ".attn.out_proj.weight")):  # OpenCLIP attention: not for LyCORIS
            continue
        out, n = t.shape[0], int(torch.tensor(t.shape[1:]).prod())
        for i in (1, 2):
            sd[f"{t.name}.hada_w{i}_a"] = torch.randn(out, 3, generator=g) * 0.2
            sd[f"{t.name}.hada_w{i}_b"] = torch.randn(3, n, generator=g) * 0.2
        sd[f"{t.name}.alpha"] = torch.tensor(2.0)
        keys[t.name] = t.key
    loha = tmp_path / "xl-loha.safetensors"
    save_lora(loha, sd, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0"}, "float")
    merge_lora_into_checkpoint(tmp_path / "base.safetensors", [f"{loha}:0.6"], tmp_path / "m.safetensors")
    merged = load(tmp_path / "m.safetensors")
    for name, w in group_modules(sd).items():
        want = base[keys[name]] + updown(w, base[keys[name]], 0.6)[0]
        torch.testing.assert_close(merged[keys[name]], want, rtol=1e-5, atol=1e-6)
    resize_lora(loha, tmp_path / "r.safetensors", new_rank=256)
    r = load(tmp_path / "r.safetensors")
    for name, key in keys.items():
        assert r[f"{name}.lora_down.weight"].shape[1:] == base[key].shape[1:], name
    assert r["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].dim() == 2
    merge_lora_into_checkpoint(tmp_path / "base.safetensors", [f"{tmp_path / 'r.safetensors'}:0.6"],
                               tmp_path / "m2.safetensors")
    m2 = load(tmp_path / "m2.safetensors")
    for key in keys.values():
        _close(m2[key] - base[key], merged[key] - base[key])
