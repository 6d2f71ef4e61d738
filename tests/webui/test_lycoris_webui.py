"""Issue 5's real-host check: LoKr and LoHa epochs trained by our CLI (network_module = lycoris.kohya)
on the WebUI's own tiny checkpoint load in a real WebUI v1.10.1 through <lora:...> with no unmatched
key and no layer error, and change the image. Skips unless LORA_TRAINER_WEBUI_DIR is set."""
import re
import subprocess
import sys

import numpy as np
import pytest

from lora_trainer import tiny

pytest.importorskip("lycoris")

ALGOS = {
    "lyco_lokr": '["algo=lokr", "factor=4", "conv_dim=4", "conv_alpha=2"]',
    "lyco_loha": '["algo=loha", "conv_dim=4", "conv_alpha=2"]',
}


def _train(webui, tmp_path, name, args):
    ds = tmp_path / "dataset"
    if not ds.is_dir():
        tiny.make_dataset(ds)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f"""
train_data_dir = "{ds}"
output_dir = "{webui.lora_dir / 'lyco'}"
output_name = "{name}"
pretrained_model_name_or_path = "{webui.checkpoint}"
resolution = "64"
min_bucket_reso = 64
max_bucket_reso = 128
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 4
network_args = {args}
learning_rate = 0.005
text_encoder_lr = 0.002
lr_scheduler = "constant"
max_train_epochs = 2
train_batch_size = 2
mixed_precision = "no"
save_precision = "fp16"
max_token_length = 75
""")
    r = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(cfg)], env=webui.cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lokr_and_loha_epochs_load_in_the_webui_and_change_the_image(webui, tmp_path):
    for name, args in ALGOS.items():
        _train(webui, tmp_path, name, args)
    status, _ = webui.call("/sdapi/v1/refresh-loras", {})
    assert status == 200
    _, loras = webui.call("/sdapi/v1/loras")
    names = {lo["name"] for lo in loras}
    for name in ALGOS:
        assert {f"{name}-000001", f"{name}-000002", name} <= names, sorted(names)
    log_start = len(webui.log())
    prompt = "trigger_a, red circle"
    base, _ = webui.txt2img(prompt)
    again, _ = webui.txt2img(prompt)
    assert np.array_equal(base, again)
    for name in ALGOS:
        for epoch in (f"{name}-000001", f"{name}-000002"):
            img, info = webui.txt2img(f"{prompt} <lora:{epoch}:1>")
            assert np.abs(img - base).mean() > 0.5, f"{epoch} did not change the image"
            assert "Lora hashes" in info and epoch in info
    log = webui.log()[log_start:]
    for bad in ("didn't match keys", "Networks with errors", "Lora not found", "Traceback"):
        assert bad not in log, log[-3000:]
    assert not re.search(r"Network \S+ layer \S+:", log), log[-3000:]
