"""resize: SVD rank reduction of a LoRA/LoCon file, checked against ΔW computed here."""
import json

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.io.hashes import addnet_hash_file
from lora_trainer.post import resize_lora
from test_post_support import file_deltas, load, meta, random_lora, save_net


@pytest.fixture(scope="module")
def lora(sd1_host, tmp_path_factory):
    """rank 8 (alpha 4) linear modules, rank 4 (alpha 2) 3x3 convs; lora_up with a decaying spectrum so
    the dynamic methods have something to choose."""
    net = random_lora(sd1_host, dim=8, alpha=4, conv_dim=4, conv_alpha=2, seed=3)
    with torch.no_grad():
        for m in net.lora_modules():
            r = m.lora_up.weight.shape[1]
            decay = 0.6 ** torch.arange(r, dtype=torch.float32)
            m.lora_up.weight.mul_(decay.reshape(1, r, *([1] * (m.lora_up.weight.dim() - 2))))
    return save_net(net, tmp_path_factory.mktemp("resize") / "in.safetensors", ss_network_args=json.dumps(
        {"conv_dim": "4", "conv_alpha": "2"}))


def _svd(d):
    return torch.linalg.svd(d, full_matrices=False)


def test_full_rank_reproduces_delta(lora, tmp_path):
    out = tmp_path / "full.safetensors"
    r = resize_lora(lora, out, new_rank=8)
    before, after = file_deltas(load(lora)), file_deltas(load(out))
    assert before.keys() == after.keys()
    for name, d in before.items():
        torch.testing.assert_close(after[name], d, rtol=1e-4, atol=1e-6 * d.abs().max().item() + 1e-9)
    assert all(m.fro > 0.99999 for m in r.modules)
    sd = load(out)
    # alpha / rank (the strength at weight 1) is kept: 4/8 for linear, 2/4 for convs
    for name in before:
        assert float(sd[f"{name}.alpha"]) / sd[f"{name}.lora_down.weight"].shape[0] == pytest.approx(0.5)


def test_sv_fro_keeps_90_percent_of_every_module_with_sd_scripts_rank(lora, tmp_path):
    out = tmp_path / "fro.safetensors"
    r = resize_lora(lora, out, new_rank=32, dynamic_method="sv_fro", dynamic_param=0.9, save_precision="float")
    before, after = file_deltas(load(lora)), file_deltas(load(out))
    ranks = []
    for name, d in before.items():
        kept = after[name].norm() / d.norm()
        assert kept >= 0.9 - 1e-6, (name, float(kept))
        s = torch.linalg.svdvals(d)
        rank = load(out)[f"{name}.lora_down.weight"].shape[0]
        ranks.append(rank)
        # sd-scripts' rank: one more than the least that reaches 90 % (at least 2), at most the input's + 1
        least = int(((s.square().cumsum(0) / s.square().sum()).sqrt() < 0.9).sum()) + 1
        assert rank == max(2, least + 1), (name, rank, least)
        # and what is kept is the best approximation at that rank
        u, sv, vh = _svd(d)
        best = u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank]
        torch.testing.assert_close(after[name], best, rtol=1e-4, atol=1e-5 * d.abs().max().item())
    assert min(ranks) < max(ranks) <= 8 and max(ranks) < 8  # ranks really differ per module and shrink
    assert [m.new_rank for m in r.modules] == ranks
    md = meta(out)
    assert md["ss_network_dim"] == md["ss_network_alpha"] == "Dynamic"
    assert md["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 8")
    assert md["ss_output_name"] == "fro"
    assert json.loads(md["lora_trainer_post"])[-1]["tool"] == "resize"


def test_fixed_rank_is_the_best_approximation_and_metadata_follows(lora, tmp_path):
    out = tmp_path / "r2.safetensors"
    resize_lora(lora, out, new_rank=2, new_conv_rank=1)
    sd = load(out)
    for name, d in file_deltas(load(lora)).items():
        conv = sd[f"{name}.lora_down.weight"].dim() == 4  # as sd-scripts: 1x1 convs take new_conv_rank too
        rank = 1 if conv else 2
        assert sd[f"{name}.lora_down.weight"].shape[0] == rank
        u, s, vh = _svd(d)
        err = (file_deltas(sd)[name] - d).norm()
        assert err == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-3, abs=1e-7)
    md = meta(out)
    assert md["ss_network_dim"] == "2" and float(md["ss_network_alpha"]) == pytest.approx(1.0)
    args = json.loads(md["ss_network_args"])
    assert args["conv_dim"] == "1" and float(args["conv_alpha"]) == pytest.approx(0.5)
    assert md["sshs_model_hash"] == addnet_hash_file(out)  # recomputed for the new tensors
    assert md["sshs_model_hash"] != meta(lora)["sshs_model_hash"]


def test_the_guides_example_as_written(lora, tmp_path):
    """new_rank 32, sv_fro 0.9, bf16 (through the CLI)."""
    from lora_trainer.cli import main
    out = tmp_path / "guide.safetensors"
    rc = main(["resize", "--model", str(lora), "--save_to", str(out), "--new_rank", "32", "--dynamic_method", "sv_fro",
               "--dynamic_param", "0.9", "--save_precision", "bf16", "-q"])
    assert rc == 0
    sd = load(out)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    before, after = file_deltas(load(lora)), file_deltas(sd)
    assert all(after[n].norm() / d.norm() > 0.89 for n, d in before.items())  # bf16 rounding on top of 90 %


def test_user_errors_write_nothing(lora, tmp_path):
    with pytest.raises(UserError, match="new_rank"):
        resize_lora(lora, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="sv_ratio must be >= 1"):
        resize_lora(lora, tmp_path / "a.safetensors", dynamic_method="sv_ratio", dynamic_param=0.5)
    with pytest.raises(UserError, match="one of the inputs"):
        resize_lora(lora, lora, new_rank=2)
    ia3 = tmp_path / "ia3.safetensors"  # IA3 scales the checkpoint's weights: no ΔW without them
    from safetensors.torch import save_file
    save_file({"lora_unet_x.weight": torch.ones(4), "lora_unet_x.on_input": torch.tensor(False)}, str(ia3))
    with pytest.raises(UserError, match="IA3.*extract"):
        resize_lora(ia3, tmp_path / "a.safetensors", new_rank=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ia3.safetensors"]
