"""Issue 8 in a real WebUI v1.10.1 (CPU, tiny random checkpoints): SDXL trained on the loaded model
through the API (UNet + both text encoders, and UNet-only with cached text-encoder outputs), the files
listed for the SDXL model, ``<lora:…>`` changing the image with no unmatched key, the model bitwise as
before, the X/Y/Z preset accepted by txt2img; the CLI on the same checkpoint writing the same keys and
metadata fields; the CLI's SDXL code equal to sgm's on that checkpoint; and SD2-v end to end."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_trainer import tiny

from .harness import ROOT


def _wait_done(webui, timeout=900):
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, st = webui.call("/lora-trainer/v1/status")
        if st["state"] not in ("running", "stopping"):
            return st
        time.sleep(0.5)
    raise AssertionError("training did not finish")


def _bad_log(text):
    return [l for l in text.splitlines() if any(s in l for s in ("didn't match keys", "Networks with errors",
                                                                 "Traceback", "Lora not found"))]


def _train(webui, cfg):
    status, r = webui.call("/lora-trainer/v1/train", cfg)
    assert status == 200, r
    st = _wait_done(webui)
    assert st["state"] == "done", st.get("error")
    return st


def _check_run(webui, name, base, prompt, model_kind):
    """Epochs listed with the model kind's metadata, sidecar, image changed, no unmatched key."""
    _, loras = webui.call("/sdapi/v1/loras")
    by_name = {l["name"]: l for l in loras}
    assert {f"{name}-000001", f"{name}-000002", name} <= set(by_name)
    meta = by_name[name].get("metadata") or {}
    if model_kind == "sdxl":
        assert meta.get("ss_base_model_version") == "sdxl_base_v1-0"   # the WebUI lists it for SDXL models
    else:
        assert meta.get("ss_v2") == "True" and meta.get("ss_base_model_version") == "sd_v2_v"
    card = json.loads((webui.lora_dir / name / f"{name}-000002.json").read_text())
    assert card["sd version"] == {"sdxl": "SDXL", "sd2": "SD2"}[model_kind]
    start = len(webui.log())
    with_lora, info = webui.txt2img(f"{prompt} <lora:{name}-000002:1>")
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA did not change the image"
    assert "Lora hashes" in info
    assert not _bad_log(webui.log()[start:]), _bad_log(webui.log()[start:])
    return with_lora


CFG = {"resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128, "network_dim": 8, "network_alpha": 8,
       "network_args": ["conv_dim=4", "conv_alpha=4"], "learning_rate": 5e-3, "text_encoder_lr": 2e-3,
       "lr_scheduler": "constant", "max_train_epochs": 2, "train_batch_size": 2, "mixed_precision": "no",
       "keep_tokens": 1, "max_token_length": 75, "save_precision": "float"}


def test_sdxl_through_the_api_and_the_cli(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    webui.switch_checkpoint("tiny-sdxl")
    try:
        prompt = "trigger_a, red circle"
        base, _ = webui.txt2img(prompt)
        _, before = webui.call("/lora-trainer/v1/model-hash")
        # 1. UNet + both text encoders (LoCon)
        full = dict(CFG, train_data_dir=str(ds), output_name="xlfull")
        _train(webui, full)
        _, after = webui.call("/lora-trainer/v1/model-hash")
        assert after["sha256"] == before["sha256"]
        _check_run(webui, "xlfull", base, prompt, "sdxl")
        # 2. UNet only, text-encoder outputs cached, gradient checkpointing (the SDXL presets' way), under
        #    the WebUI's Zero Terminal SNR noise schedule
        webui.txt2img(prompt)   # unmerge the LoRA the previous generation left in the weights
        _, before2 = webui.call("/lora-trainer/v1/model-hash")
        assert webui.call("/sdapi/v1/options", {"sd_noise_schedule": "Zero Terminal SNR"})[0] == 200
        try:
            _train(webui, dict(full, output_name="xlunet", network_train_unet_only=True,
                               cache_text_encoder_outputs=True, shuffle_caption=True, gradient_checkpointing=True))
        finally:
            webui.call("/sdapi/v1/options", {"sd_noise_schedule": "Default"})
        _, after2 = webui.call("/lora-trainer/v1/model-hash")
        assert after2["sha256"] == before2["sha256"]
        _check_run(webui, "xlunet", base, prompt, "sdxl")
        from lora_trainer.io.lora_file import load_lora
        unet_only, meta = load_lora(webui.lora_dir / "xlunet" / "xlunet.safetensors")
        assert unet_only and all(k.startswith("lora_unet_") for k in unet_only)
        assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_gradient_checkpointing"] == "True"
        _, full_meta = load_lora(webui.lora_dir / "xlfull" / "xlfull.safetensors")
        assert full_meta["ss_zero_terminal_snr"] == "False"
        # 3. the X/Y/Z preset of the run (SDXL: the run's own size unless asked) runs through txt2img
        status, preset = webui.call("/lora-trainer/v1/xyz?folder=xlfull")
        assert status == 200, preset
        assert (preset["width"], preset["height"]) == (64, 64)    # ss_resolution of the run
        req = preset["txt2img_request"]
        req.update(steps=2)
        status, grid = webui.call("/sdapi/v1/txt2img", req)
        assert status == 200 and grid["images"], grid
        # 4. the CLI on the same checkpoint with the same config: same keys, same metadata fields
        cfg = tmp_path / "cli.toml"
        lines = [f'pretrained_model_name_or_path = "{webui.home / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors"}"',
                 f'train_data_dir = "{ds}"', f'output_dir = "{webui.lora_dir / "xlcli"}"', 'output_name = "xlcli"']
        for k, v in CFG.items():
            lines.append(f"{k} = {json.dumps(v)}")
        cfg.write_text("\n".join(lines))
        r = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(cfg)], env=webui.cli_env(),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        cli_sd, cli_meta = load_lora(webui.lora_dir / "xlcli" / "xlcli.safetensors")
        web_sd, web_meta = load_lora(webui.lora_dir / "xlfull" / "xlfull.safetensors")
        assert set(cli_sd) == set(web_sd)
        assert {k: v.shape for k, v in cli_sd.items()} == {k: v.shape for k, v in web_sd.items()}
        assert set(cli_meta) == set(web_meta), set(cli_meta) ^ set(web_meta)
        status, _ = webui.call("/sdapi/v1/refresh-loras", {})
        webui.txt2img(prompt)
        start = len(webui.log())
        with_cli, _ = webui.txt2img(f"{prompt} <lora:xlcli:1>")
        assert np.abs(with_cli - base).mean() > 0.5
        assert not _bad_log(webui.log()[start:]), _bad_log(webui.log()[start:])
    finally:
        webui.switch_checkpoint("tiny-sd1")


def test_cli_sdxl_code_equals_sgm_on_the_harness_checkpoint(webui):
    """Our diffusers-based SDXL UNet (sgm names) and text encoders against sgm's own classes, in the
    WebUI's venv (needs diffusers there: skipped otherwise)."""
    probe = subprocess.run([webui.python, "-c", "import diffusers"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("diffusers is not installed in the WebUI's venv (the CLI's SDXL code needs it)")
    repos = webui.dir / "repositories"
    env = dict(webui.cli_env(), PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(repos / "generative-models"), str(repos / "stable-diffusion-stability-ai")]))
    r = subprocess.run([webui.python, str(ROOT / "tests" / "webui" / "sdxl_parity_probe.py"),
                        str(webui.home / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["crossattn"] < 1e-5 and d["pooled"] < 1e-5 and d["unet"] < 1e-5 * max(1.0, d["scale"]), d


def test_sd2v_through_the_api(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    ckpt_dir = webui.home / "models" / "Stable-diffusion"
    if not (ckpt_dir / "tiny-sd2v.safetensors").is_file():
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "webui" / "make_tiny_sd2v.py"), str(ckpt_dir)],
                           env=webui.cli_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        webui.call("/sdapi/v1/refresh-checkpoints", {})
    webui.switch_checkpoint("tiny-sd2v")
    try:
        prompt = "trigger_a, red circle"
        base, _ = webui.txt2img(prompt)
        _, before = webui.call("/lora-trainer/v1/model-hash")
        _train(webui, dict(CFG, train_data_dir=str(ds), output_name="sd2v", network_args=[]))
        _, after = webui.call("/lora-trainer/v1/model-hash")
        assert after["sha256"] == before["sha256"]
        from lora_trainer.io.lora_file import load_lora
        sd, meta = load_lora(webui.lora_dir / "sd2v" / "sd2v.safetensors")
        assert meta["modelspec.prediction_type"] == "v"
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
        _check_run(webui, "sd2v", base, prompt, "sd2")
        status, preset = webui.call("/lora-trainer/v1/xyz?folder=sd2v")
        assert status == 200, preset
        req = preset["txt2img_request"]
        req.update(steps=2)
        status, grid = webui.call("/sdapi/v1/txt2img", req)
        assert status == 200 and grid["images"], grid
    finally:
        webui.switch_checkpoint("tiny-sd1")


def test_medvram_sdxl_trains_the_unet_and_refuses_the_text_encoders(tmp_path_factory):
    """Under --medvram-sdxl the WebUI moves the UNet, text encoders and VAE between devices in forward
    pre-hooks: a UNet-only run with cached text-encoder outputs works through them; training the text
    encoders is refused before any work, with what to change."""
    from .harness import WebUI
    w = WebUI(tmp_path_factory.mktemp("webui-medvram"), extra_args="--medvram-sdxl")
    w.prepare()
    w.start()
    try:
        ds = tiny.make_dataset(tmp_path_factory.mktemp("ds-medvram") / "dataset")
        w.switch_checkpoint("tiny-sdxl")
        _, before = w.call("/lora-trainer/v1/model-hash")
        status, r = w.call("/lora-trainer/v1/train", dict(CFG, train_data_dir=str(ds), output_name="mv_te"))
        st = _wait_done(w) if status == 200 else {"state": "refused", "error": r.get("error")}
        assert st["state"] in ("refused", "error") and "network_train_unet_only" in (st.get("error") or ""), st
        assert not list((w.lora_dir / "mv_te").glob("*.safetensors")) if (w.lora_dir / "mv_te").exists() else True
        st = _train(w, dict(CFG, train_data_dir=str(ds), output_name="mv", network_train_unet_only=True,
                            cache_text_encoder_outputs=True))
        assert [os.path.basename(f) for f in st["files"]] == ["mv-000001.safetensors", "mv-000002.safetensors",
                                                              "mv.safetensors"]
        _, after = w.call("/lora-trainer/v1/model-hash")
        assert after["sha256"] == before["sha256"]
        base, _ = w.txt2img("trigger_a, red circle")
        with_lora, _ = w.txt2img("trigger_a, red circle <lora:mv:1>")
        assert np.abs(with_lora - base).mean() > 0.5
    finally:
        w.stop()
