"""LyCORIS (network_module = lycoris.kohya) and DyLoRA on tiny real models: for every algorithm the
forward with the adapter equals the forward of the model with the saved file applied by the WebUI's
merge rule (lora_trainer.networks.webui_math, written from the WebUI's network_*.py), every saved
key resolves by the WebUI's naming rule, removing restores the model exactly, and files reload.
Known library faults are worked around or refused with a message."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("lycoris")

from lora_trainer.config import parse_value  # noqa: E402
from lora_trainer.errors import ConfigError, UserError  # noqa: E402
from lora_trainer.io.lora_file import load_lora  # noqa: E402
from lora_trainer.networks import dylora  # noqa: E402
from lora_trainer.networks.lycoris_adapter import LycorisNetwork  # noqa: E402
from lora_trainer.networks.naming import resolve_key, webui_layer_names  # noqa: E402
from lora_trainer.networks.webui_math import merged_into  # noqa: E402

CASES = {
    "lora": ["algo=lora"],
    "locon": ["algo=locon", "conv_dim=4", "conv_alpha=2"],
    "loha": ["algo=loha"],                      # alpha != dim: LyCORIS' own merge would be wrong here
    "loha-cp": ["algo=loha", "use_cp=True"],
    "lokr": ["algo=lokr", "factor=4"],
    "lokr-decomposed": ["algo=lokr", "factor=4", "decompose_both=True"],
    "lokr-cp": ["algo=lokr", "use_cp=True"],
    "ia3": ["algo=ia3", "preset=ia3"],
    "dylora": ["algo=dylora", "block_size=2"],
    "full": ["algo=full"],
    "diag-oft": ["algo=diag-oft", "constraint=0.01"],
    "boft": ["algo=boft"],
    "lora-cp": ["algo=lora", "use_cp=True"],
    "dora": ["algo=lora", "dora_wd=True"],
    "train_norm": ["algo=lokr", "train_norm=True"],
    "attn-only": ["algo=lora", "preset=attn-only"],
    "full-lin": ["algo=loha", "preset=full-lin"],
    "unet-convblock-only": ["algo=lokr", "preset=unet-convblock-only"],
    "unet-transformer-only": ["algo=lokr", "preset=unet-transformer-only"],
    "attn-mlp-dropout": ["algo=loha", "preset=attn-mlp", "dropout=0.1", "rank_dropout=0.1", "module_dropout=0.1"],
}


def _args(items):
    return {k: parse_value(v) for k, v in (a.split("=", 1) for a in items)}


from conftest import forward_probe as _forward  # noqa: E402


def _randomise(net, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture()
def sd1(sd1_host):
    sd1_host.prepare()
    yield sd1_host
    sd1_host.restore()


def _check_against_file(host, net, is_sd2=False):
    cond0, y0 = _forward(host)
    net.eval()
    net.apply()
    cond1, y1 = _forward(host)
    net.remove()
    cond2, y2 = _forward(host)
    assert torch.equal(y2, y0) and torch.equal(cond2, cond0), "remove() did not restore the model"
    assert (y1 - y0).abs().max() > 1e-3, "the adapter changes nothing"
    sd = net.kohya_state_dict()
    layers = webui_layer_names(host.unet, host.text_encoders)
    names = {k.split(".")[0] for k in sd}
    unresolved = sorted(n for n in names if resolve_key(n, layers, is_sd2) is None)
    assert not unresolved, unresolved[:3]
    with merged_into(host.unet, host.text_encoders, sd, is_sd2=is_sd2) as unmatched:
        cond3, y3 = _forward(host)
    assert not unmatched
    torch.testing.assert_close(y3, y1, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(cond3, cond1, rtol=1e-4, atol=2e-5)
    return sd, y1


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_forward_equals_the_file_applied_the_webui_way(case, sd1):
    net = LycorisNetwork.create(sd1.unet, sd1.text_encoders, dim=4, alpha=2, network_args=_args(CASES[case]))
    assert net.unet_names
    if "preset=unet" not in " ".join(CASES[case]):
        assert net.te_names
    _randomise(net)
    sd, y1 = _check_against_file(sd1, net)
    # the file reloads into a network built from the same settings (IA3/DyLoRA included)
    net2 = LycorisNetwork.create(sd1.unet, sd1.text_encoders, dim=4, alpha=2, network_args=_args(CASES[case]))
    net2.load_kohya_state_dict(sd)
    net2.eval()
    net2.apply()
    try:
        _, y4 = _forward(sd1)
    finally:
        net2.remove()
    torch.testing.assert_close(y4, y1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_adapter_forward_equals_the_file_applied_the_webui_way(case, sdxl_host):
    """Every algorithm on SDXL (UNet in sgm names + CLIP-L; the OpenCLIP encoder is refused as for SD2)."""
    host = sdxl_host
    host.prepare()
    try:
        net = LycorisNetwork.create(host.unet, host.text_encoders[:1], dim=4, alpha=2, network_args=_args(CASES[case]))
        assert net.unet_names and all(n.startswith(("lora_unet_", "lora_te1_")) for n in net.unet_names + net.te_names)
        _randomise(net)
        _check_against_file(host, net)
        with pytest.raises(UserError, match="network_train_unet_only"):
            LycorisNetwork.create(host.unet, host.text_encoders, dim=4, alpha=2, network_args=_args(CASES[case]))
    finally:
        host.restore()


def test_kohya_dylora_forward_equals_file_and_trains_one_block(sd1):
    net = dylora.create(sd1.unet, sd1.text_encoders, dim=4, alpha=2, network_args={"unit": 2, "conv_dim": 2})
    _randomise(net)
    sd, _ = _check_against_file(sd1, net)
    assert {k.split(".", 1)[1] for k in sd} == {"lora_up.weight", "lora_down.weight", "alpha"}
    # a training forward gives a gradient to one block of each module only (the others stay None)
    net.train()
    net.apply()
    try:
        torch.manual_seed(3)
        cond, y = _forward(sd1)
        g = torch.Generator().manual_seed(0)
        z = torch.randn((2, 4, 8, 8), generator=g)
        out = sd1.denoise(z, torch.tensor([100, 700]), cond)
        out.square().mean().backward()
    finally:
        net.remove()
    m = net._modules[net.unet_names[0]]
    with_grad = [p.grad is not None for p in m.up_blocks]
    assert sum(with_grad) == 1, with_grad


def test_lycoris_on_sd2_trains_the_unet_and_refuses_openclip(sd2v_host):
    host = sd2v_host
    host.prepare()
    try:
        with pytest.raises(UserError, match="network_train_unet_only"):
            LycorisNetwork.create(host.unet, host.text_encoders, dim=4, alpha=4, network_args={"algo": "lokr"})
        net = LycorisNetwork.create(host.unet, [], dim=4, alpha=2, network_args={"algo": "loha"})
        _randomise(net)
        _check_against_file(host, net, is_sd2=True)
    finally:
        host.restore()


@pytest.mark.parametrize("args, expect", [
    (["algo=glora"], "cannot load GLoRA"),
    (["algo=tlora"], "does not know"),
    (["algo=lycoris"], "is unknown"),
    (["algo=lokr", "factr=4"], "not understood"),
    (["algo=lora", "preset=attn"], "preset=attn is unknown"),
    (["algo=lora", "dora_wd=True", "wd_on_output=True"], "Remove wd_on_output"),
    (["algo=lokr", "factor=0"], "factor=0"),
    (["algo=lora", "dropout=1.5"], "probability"),
])
def test_bad_lycoris_settings_are_refused_with_the_fix(args, expect, sd1):
    with pytest.raises(UserError, match=expect):
        LycorisNetwork.create(sd1.unet, sd1.text_encoders, dim=4, alpha=4, network_args=_args(args))


def test_train_lokr_and_resume_ia3_through_the_run(sd1_host, tiny_cfg, tmp_path):
    from lora_trainer.run import train
    captured = {}

    def grab(network):
        network.eval()
        captured["y"] = _forward(sd1_host)[1]
        captured["sd"] = network.kohya_state_dict()

    cfg = tiny_cfg.replace(network_module="lycoris.kohya", network_args=["algo=lokr", "factor=4", "conv_dim=2"],
                           save_precision="float", max_train_epochs=1)
    result = train(cfg, sd1_host, before_restore=grab)
    sd, meta = load_lora(result.final_file)
    assert meta["ss_network_module"] == "lycoris.kohya" and "lokr" in meta["ss_network_args"]
    assert set(sd) == set(captured["sd"])
    sd1_host.prepare()
    try:
        with merged_into(sd1_host.unet, sd1_host.text_encoders, sd) as unmatched:
            y = _forward(sd1_host)[1]
    finally:
        sd1_host.restore()
    assert not unmatched
    torch.testing.assert_close(y, captured["y"], rtol=1e-4, atol=2e-5)

    # IA3 files do not reload through lycoris-lora; here they resume through network_weights
    ia3 = tiny_cfg.replace(network_module="lycoris.kohya", network_args=["algo=ia3", "preset=ia3"],
                           output_name="ia3", max_train_epochs=1, learning_rate=1e-2)
    first = train(ia3, sd1_host)
    again = train(ia3.replace(network_weights=str(first.final_file), output_name="ia3b"), sd1_host)
    assert again.steps_done > 0
    with pytest.raises(ConfigError, match="algo=glora"):
        train(tiny_cfg.replace(network_module="lycoris.kohya", network_args=["algo=glora"]), sd1_host)
    with pytest.raises(ConfigError, match="not available"):
        train(tiny_cfg.replace(network_module="networks.oft"), sd1_host)


def test_networks_dylora_through_the_run(sd1_host, tiny_cfg):
    from lora_trainer.run import train
    result = train(tiny_cfg.replace(network_module="networks.dylora", network_args=["unit=2"], max_train_epochs=1),
                   sd1_host)
    sd, _ = load_lora(result.final_file)
    assert all(k.endswith(("lora_up.weight", "lora_down.weight", "alpha")) for k in sd)
    with pytest.raises(ConfigError, match="multiple of unit"):
        train(tiny_cfg.replace(network_module="networks.dylora", network_args=["unit=3"]), sd1_host)
