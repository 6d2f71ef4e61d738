"""The README's first command and the CLI's contract, run as a user would."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_then_train_from_its_config(tmp_path):
    out = tmp_path / "demo"
    r = _run(["demo", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"validation loss: ([\d.]+) -> ([\d.]+)", r.stdout)
    assert m and float(m[2]) < float(m[1]), r.stdout
    assert len(re.findall(r"^epoch \d: mean loss", r.stdout, re.M)) == 3
    for n in ("demo-000001", "demo-000002", "demo-000003", "demo"):
        assert (out / "output" / f"{n}.safetensors").is_file()
    assert (out / "config.toml").is_file() and (out / "model" / "tiny-sd1.yaml").is_file()
    assert "Traceback" not in r.stderr and "Warning" not in r.stdout + r.stderr
    # the config it leaves reruns the job, with overrides
    r2 = _run(["train", "--config", str(out / "config.toml"), "--set", "output_name=again",
               "--set", "max_train_epochs=1"], tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert (out / "output" / "again-000001.safetensors").is_file() and (out / "output" / "again.safetensors").is_file()


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('train_data_dir = "/nope"\noutput_dir = "out"\nnetwork_dim = 0\n')
    r = _run(["train", "--config", str(cfg)], tmp_path)
    assert r.returncode == 2 and "network_dim = 0" in r.stderr and "Traceback" not in r.stderr
    r = _run(["train", "--config", str(tmp_path / "missing.toml")], tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    cfg.write_text('train_data_dir = "/nope"\noutput_dir = "out"\npretrained_model_name_or_path = "/x.safetensors"\n')
    r = _run(["train", "--config", str(cfg)], tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_known_architectures_match_the_webui_yamls():
    from lora_trainer.ldm_configs import known_config
    sd1, sd2v = known_config("sd1")["model"]["params"], known_config("sd2-v")["model"]["params"]
    assert sd1["unet_config"]["params"]["context_dim"] == 768 and "parameterization" not in sd1
    assert sd1["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")
    assert sd2v["parameterization"] == "v" and sd2v["unet_config"]["params"]["context_dim"] == 1024
    assert sd2v["unet_config"]["params"]["use_linear_in_transformer"] is True
    assert all(c["model"]["params"]["unet_config"]["params"]["use_checkpoint"] is False
               for c in (known_config(k) for k in ("sd1", "sd2", "sd2-v")))


def test_sdxl_demo_trains_unet_only_with_cached_text_outputs(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "demo"
    r = _run(["demo", "--model", "sdxl", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"validation loss: ([\d.]+) -> ([\d.]+)", r.stdout)
    assert m and float(m[2]) < float(m[1]) * 0.95, r.stdout
    assert (out / "model" / "tiny-sdxl.yaml").is_file() and (out / "output" / "sample").is_dir()
    assert "Traceback" not in r.stderr and "Warning" not in r.stdout + r.stderr, r.stderr
    from lora_trainer.io.lora_file import load_lora
    sd, meta = load_lora(out / "output" / "demo.safetensors")
    assert all(k.startswith("lora_unet_") for k in sd) and meta["ss_base_model_version"] == "sdxl_base_v1-0"
