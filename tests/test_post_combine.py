"""combine: one LoRA that equals applying the inputs with their ratios (exactly, by concatenated ranks),
or the best approximation of that at a chosen rank."""
import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.post import combine_loras
from test_post_support import file_deltas, load, meta, random_lora, save_net


@pytest.fixture(scope="module")
def files(sd1_host, tmp_path_factory):
    d = tmp_path_factory.mktemp("combine")
    a = random_lora(sd1_host, dim=8, alpha=4, conv_dim=4, conv_alpha=2, seed=11)
    b = random_lora(sd1_host, dim=4, alpha=1, conv_dim=2, conv_alpha=2, seed=12, style="ldm")  # other names
    return (a, save_net(a, d / "a.safetensors", ss_tag_frequency='{"1_a": {"red": 2}}'),
            b, save_net(b, d / "b.safetensors", ss_tag_frequency='{"1_a": {"red": 1, "blue": 3}}'))


def _expected(a, b, ratio_a, ratio_b):
    """ΔA·ra + ΔB·rb per layer, keyed by A's names (B's LDM names land on the same layers)."""
    da, db = file_deltas(load(a)), file_deltas(load(b))
    from lora_trainer.post.combine import canonical_layer
    by_layer = {canonical_layer(n, "sd1"): d for n, d in db.items()}
    return {n: d * ratio_a + by_layer[canonical_layer(n, "sd1")] * ratio_b for n, d in da.items()}, len(db)


def test_concatenated_ranks_equal_the_weighted_sum(files, tmp_path):
    net_a, a, net_b, b = files
    out = tmp_path / "c.safetensors"
    report = combine_loras([f"{a}:1", f"{b}:-0.5"], out)
    expected, n_b = _expected(a, b, 1.0, -0.5)
    got = file_deltas(load(out))
    assert sorted(got) == sorted(expected) and n_b == len(expected)  # B's 129 modules matched A's, none doubled
    for name, d in expected.items():
        torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-7)
    assert {m.rank for m in report.modules} == {12, 6}
    md = meta(out)
    assert md["ss_network_dim"] == "Dynamic" and md["ss_output_name"] == "c"
    assert "combined a.safetensors x 1, b.safetensors x -0.5" in md["ss_training_comment"]
    assert md["ss_tag_frequency"] == '{"1_a": {"red": 3, "blue": 3}}'


def test_combined_file_applied_equals_both_applied(files, sd1_host, tmp_path):
    net_a, a, net_b, b = files
    out = combine_loras([(a, 1.0), (b, 0.5)], tmp_path / "c.safetensors").output
    combined = LoRANetwork.create(sd1_host.unet, sd1_host.text_encoders, dim=12, alpha=12, conv_dim=6, conv_alpha=6)
    combined.load_kohya_state_dict(load(out))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([300])
    with torch.no_grad():
        base = sd1_host.unet(x, t, context=ctx)
        with net_a.applied_to_model(1.0), net_b.applied_to_model(0.5):
            both = sd1_host.unet(x, t, context=ctx)
        with combined.applied_to_model(1.0):
            one = sd1_host.unet(x, t, context=ctx)
    assert (both - base).abs().max() > 1e-3
    torch.testing.assert_close(one, both, rtol=1e-4, atol=1e-5)


def test_new_rank_refactors_to_the_best_approximation(files, tmp_path):
    _, a, _, b = files
    expected, _ = _expected(a, b, 0.8, 0.6)
    exact = file_deltas(load(combine_loras([f"{a}:0.8", f"{b}:0.6"], tmp_path / "r12.safetensors", new_rank=12).output))
    for name, d in expected.items():  # rank 12 holds the whole sum
        torch.testing.assert_close(exact[name], d, rtol=1e-4, atol=1e-6)
    report = combine_loras([f"{a}:0.8", f"{b}:0.6"], tmp_path / "r3.safetensors", new_rank=3, new_conv_rank=2)
    sd = load(report.output)
    got = file_deltas(sd)
    for name, d in expected.items():
        r = sd[f"{name}.lora_down.weight"].shape[0]
        assert r == (2 if sd[f"{name}.lora_down.weight"].dim() == 4 and sd[f"{name}.lora_down.weight"].shape[-1] == 3 else 3)
        s = torch.linalg.svdvals(d)
        assert (got[name] - d).norm() <= s[r:].square().sum().sqrt() * (1 + 1e-4) + 1e-7
    assert meta(report.output)["ss_network_dim"] == "Dynamic"


def test_combine_refuses_mixed_model_kinds(files, sd2v_host, tmp_path):
    _, a, _, _ = files
    sd2 = save_net(random_lora(sd2v_host, seed=1), tmp_path / "sd2.safetensors", kind="sd2")
    with pytest.raises(UserError, match="different model kinds"):
        combine_loras([a, sd2], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
