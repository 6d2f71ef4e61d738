"""Issue 2's real-host check: a LoRA trained by the core on the WebUI's own tiny checkpoint loads in a
real WebUI with no unmatched key and changes the image."""
import re
import subprocess
import sys

import numpy as np

from lora_trainer import tiny


def test_trained_epochs_load_in_the_webui_and_change_the_image(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"""
train_data_dir = "{ds}"
output_dir = "{webui.lora_dir / 'core'}"
output_name = "core"
pretrained_model_name_or_path = "{webui.checkpoint}"
resolution = "64"
min_bucket_reso = 64
max_bucket_reso = 128
network_dim = 8
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=2"]
learning_rate = 0.005
text_encoder_lr = 0.002
lr_scheduler = "constant"
max_train_epochs = 3
train_batch_size = 2
mixed_precision = "no"
max_token_length = 75
""")
    r = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(cfg)], env=webui.cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    status, _ = webui.call("/sdapi/v1/refresh-loras", {})
    assert status == 200
    status, loras = webui.call("/sdapi/v1/loras")
    names = {l["name"] for l in loras}
    assert {"core-000001", "core-000002", "core-000003", "core"} <= names
    log_start = len(webui.log())
    base, _ = webui.txt2img("trigger_a, red circle")
    again, _ = webui.txt2img("trigger_a, red circle")
    assert np.array_equal(base, again)
    with_lora, info = webui.txt2img("trigger_a, red circle <lora:core-000003:1>")
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA did not change the image"
    assert "Lora hashes" in info and "core-000003" in info
    log = webui.log()[log_start:]
    assert "didn't match keys" not in log and "Networks with errors" not in log and "Traceback" not in log, log[-3000:]
