"""The post tools through ``python -m lora_trainer``: reports on stdout, exit 0; user errors exit 2."""
import pytest
import torch

from lora_trainer import tiny
from lora_trainer.cli import main
from test_post_support import random_lora, save_net


@pytest.fixture(scope="module")
def paths(sd1_host, tmp_path_factory):
    d = tmp_path_factory.mktemp("post-cli")
    ckpt = tiny.save_checkpoint(sd1_host.model, d / "model", "sd1")
    sd = random_lora(sd1_host, seed=21).kohya_state_dict()
    sd = {k: (torch.zeros_like(v) if k.startswith("lora_te_text_model_encoder_layers_1_") and "lora_up" in k else v)
          for k, v in sd.items()}
    return d, ckpt, save_net(sd, d / "a.safetensors", ss_clip_skip=2)


def test_check_resize_combine_extract(paths, tmp_path, capsys):
    d, ckpt, a = paths
    assert main(["check", str(a)]) == 0
    out = capsys.readouterr().out
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in out and "zero-expected" in out and "verdict: OK" in out
    assert main(["resize", "--model", str(a), "--save_to", str(tmp_path / "r.safetensors"), "--new_rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 -> 2" in out and "summary:" in out
    assert main(["combine", "--loras", f"{a}:1", f"{tmp_path / 'r.safetensors'}:0.5",
                 "--save_to", str(tmp_path / "c.safetensors")]) == 0
    assert "ranks concatenated (exact)" in capsys.readouterr().out
    merged = tmp_path / "m.safetensors"
    assert main(["merge", "--model", str(ckpt), "--loras", str(a), "--save_to", str(merged)]) == 0
    capsys.readouterr()
    assert main(["extract", "--model_org", str(ckpt), "--model_tuned", str(merged), "--save_to",
                 str(tmp_path / "x.safetensors"), "--dim", "8", "--conv_dim", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "text encoder included" in out and "Frobenius norm of the difference kept" in out


def test_user_errors_exit_2_with_a_message(paths, tmp_path, capsys):
    d, ckpt, a = paths
    assert main(["check", str(ckpt)]) == 2
    assert "is a Stable Diffusion checkpoint" in capsys.readouterr().err
    assert main(["resize", "--model", str(a), "--save_to", str(a), "--new_rank", "2"]) == 2
    assert "one of the inputs" in capsys.readouterr().err
    assert main(["extract", "--model_org", str(ckpt), "--model_tuned", str(a), "--save_to",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "is a LoRA, not a checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
