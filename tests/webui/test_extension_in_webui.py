"""Issue 3 in a real WebUI: the extension installed, training 2 epochs through its API on the loaded
tiny SD1 model, epochs in the Lora list, the image changes with the tag, the model bitwise unchanged,
and install.py leaving the WebUI's packages where they were."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_trainer import tiny


def _wait_done(webui, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, st = webui.call("/lora-trainer/v1/status")
        if st["state"] not in ("running", "stopping"):
            return st
        time.sleep(0.5)
    raise AssertionError("training did not finish")


def test_train_through_the_api_on_the_loaded_model(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    base, _ = webui.txt2img("trigger_a, red circle")   # (also unmerges a LoRA an earlier test left merged)
    status, before = webui.call("/lora-trainer/v1/model-hash")
    assert status == 200
    cfg = {"train_data_dir": str(ds), "output_name": "apirun", "resolution": "64", "min_bucket_reso": 64,
           "max_bucket_reso": 128, "network_dim": 8, "network_alpha": 8, "learning_rate": 5e-3,
           "text_encoder_lr": 2e-3, "lr_scheduler": "constant", "max_train_epochs": 2, "train_batch_size": 2,
           "mixed_precision": "no", "keep_tokens": 1,
           "sample_prompts": "trigger_a, red circle --w 64 --h 64 --s 4", "sample_every_n_epochs": 1}
    status, r = webui.call("/lora-trainer/v1/train", cfg)
    assert status == 200, r
    run_id = r["run_id"]
    # a second run while one is active: 409
    status, r2 = webui.call("/lora-trainer/v1/train", cfg)
    assert status in (409, 200)  # 200 only if the tiny run already finished
    st = _wait_done(webui)
    assert st["state"] == "done", st.get("error")
    assert st["run_id"] == run_id and st["step"] == st["total_steps"] > 0
    files = [os.path.basename(f) for f in st["files"]]
    assert files == ["apirun-000001.safetensors", "apirun-000002.safetensors", "apirun.safetensors"]
    assert not st["message"].startswith("apirun") or "did not bind" not in st["message"]
    out = webui.lora_dir / "apirun"
    assert (out / "apirun-000002.json").is_file() and (out / "apirun-000002.png").is_file()
    # epochs are in the WebUI's Lora list without a manual refresh
    _, loras = webui.call("/sdapi/v1/loras")
    names = {l["name"] for l in loras}
    assert {"apirun-000001", "apirun-000002", "apirun"} <= names
    # the model is bitwise as before, and generation without the tag is unchanged
    _, after = webui.call("/lora-trainer/v1/model-hash")
    assert after["sha256"] == before["sha256"]
    # no second copy of the model: every weight kept its storage before, during (checked at each epoch
    # end by the run) and after; the run reports its memory figures
    assert after["storage"] == before["storage"]
    mem = st["memory"]
    assert mem["model_storage_unchanged"] is True and mem["rss_peak_mb"] >= mem["rss_idle_mb"] > 0, mem
    assert "same storage, no copy" in st["memory_text"]
    print("WebUI run memory:", st["memory_text"])
    again, _ = webui.txt2img("trigger_a, red circle")
    assert np.array_equal(again, base)
    log_start = len(webui.log())
    with_lora, info = webui.txt2img("trigger_a, red circle <lora:apirun-000002:1>")
    _, merged = webui.call("/lora-trainer/v1/model-hash")   # the WebUI leaves that LoRA merged in the weights
    assert merged["sha256"] != before["sha256"]
    assert np.abs(with_lora - base).mean() > 0.5
    log = webui.log()[log_start:]
    assert "didn't match keys" not in log and "Networks with errors" not in log
    # generating with a LoRA merged it into the weights; the next run unmerges it to train on the base
    # model, and merges it back afterwards
    status, r = webui.call("/lora-trainer/v1/train", dict(cfg, output_name="apirun2", max_train_epochs=1,
                                                          sample_every_n_epochs=None))
    assert status == 200, r
    st = _wait_done(webui)
    assert st["state"] == "done", st.get("error")
    _, after2 = webui.call("/lora-trainer/v1/model-hash")
    assert after2["sha256"] == merged["sha256"]       # bitwise as found
    again2, _ = webui.txt2img("trigger_a, red circle <lora:apirun-000002:1>")
    assert np.array_equal(again2, with_lora)
    # a generation request sent while a run trains waits for it (the lock) instead of touching the model
    status, r = webui.call("/lora-trainer/v1/train", dict(cfg, output_name="apirun3", max_train_epochs=3,
                                                          sample_every_n_epochs=None))
    assert status == 200, r
    import threading
    done_at = {}

    def generate():
        webui.txt2img("trigger_a, red circle")
        done_at["gen"] = time.time()

    while webui.call("/lora-trainer/v1/status")[1]["phase"] not in ("caching", "training", "saving", "done"):
        time.sleep(0.05)
    th = threading.Thread(target=generate)
    th.start()
    st = _wait_done(webui)
    done_at["train"] = time.time()
    th.join()
    assert st["state"] == "done", st.get("error")
    assert done_at["gen"] >= done_at["train"] - 0.6   # it waited for the lock (status is polled every 0.5 s)
    # the X/Y/Z preset of the first run
    status, preset = webui.call(f"/lora-trainer/v1/xyz?run_id={run_id}")
    assert status == 200, preset
    assert preset["x_values"] == "apirun-000001, apirun-000002, apirun"
    assert "<lora:apirun-000001:0.7>" in preset["prompt"] and "trigger_a" in preset["prompt"]
    assert preset["infotext"].splitlines()[-1].count("X/Y/Z plot") == 1
    # and the WebUI's X/Y/Z script accepts it through the API
    req = preset["txt2img_request"]
    req.update(steps=2, width=64, height=64)
    status, grid = webui.call("/sdapi/v1/txt2img", req)
    assert status == 200, grid
    assert len(grid["images"]) >= 1


def test_bad_requests_get_messages(webui, tmp_path):
    status, r = webui.call("/lora-trainer/v1/train", {"train_data_dir": str(tmp_path / "nope"), "output_name": "x"})
    assert status == 400 and "does not exist" in r["error"]
    status, r = webui.call("/lora-trainer/v1/train", {"network_dim": 0, "train_data_dir": "/x"})
    assert status == 400 and "network_dim" in r["error"]
    status, r = webui.call("/lora-trainer/v1/train", {"netwrok_dim": 4})
    assert status == 400 and "netwrok_dim" in r["error"]


def test_install_py_moves_nothing(webui):
    env = dict(os.environ, PYTHONPATH=str(webui.dir))
    env.pop("VIRTUAL_ENV", None)
    ext = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def freeze():
        return subprocess.run([webui.python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                              check=True).stdout.splitlines()

    pinned = ("torch", "torchvision", "numpy", "protobuf", "transformers", "gradio", "pydantic", "safetensors",
              "accelerate")
    first = freeze()
    r = subprocess.run([webui.python, "install.py"], cwd=ext, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    second = freeze()
    pick = lambda lines: sorted(l for l in lines if l.split("==")[0].split(" @ ")[0].lower() in pinned)
    assert pick(first) == pick(second)          # nothing the WebUI pins moved
    t0 = time.time()
    r = subprocess.run([webui.python, "install.py"], cwd=ext, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == ""  # nothing missing: silent, no pip
    assert freeze() == second
    assert time.time() - t0 < 30


def test_tab_is_registered_and_startup_is_clean(webui):
    status, config = webui.call("/config")
    assert status == 200
    text = str(config)
    assert "Train LoRA" in text and "Tools: resize, check, merge, extract, combine" in text
    log = webui.log()
    startup = log[: log.find("Startup time")] if "Startup time" in log else log
    # the WebUI reports a checkout without an 'origin' remote (a local clone) with a traceback: not ours
    known = "Remote named 'origin' didn't exist"
    assert startup.count("Traceback") == startup.count(known), startup[-3000:]
    ours = [l for l in startup.splitlines() if ("lora_trainer" in l or "lora-trainer" in l) and
            any(w in l for w in ("Error", "error", "Exception", "Warning"))]
    assert not ours, ours


@pytest.mark.parametrize("how", ["stop", "interrupt"])
def test_stop_and_the_webuis_interrupt_keep_finished_epochs(webui, tmp_path, how):
    ds = tiny.make_dataset(tmp_path / "dataset")
    name = f"stop{how}"
    cfg = {"train_data_dir": str(ds), "output_name": name, "resolution": "64", "min_bucket_reso": 64,
           "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4, "max_train_epochs": 200,
           "train_batch_size": 1, "mixed_precision": "no"}
    status, r = webui.call("/lora-trainer/v1/train", cfg)
    assert status == 200, r
    t0 = time.time()
    while not webui.call("/lora-trainer/v1/status")[1]["files"]:
        assert time.time() - t0 < 120
        time.sleep(0.2)
    if how == "stop":
        status, r = webui.call("/lora-trainer/v1/stop", {})
    else:  # the WebUI's own Interrupt (the progress bar's button / API)
        status, r = webui.call("/sdapi/v1/interrupt", {})
    assert status == 200
    st = _wait_done(webui)
    assert st["state"] == "stopped" and st["epoch"] < 200
    kept = sorted(p.name for p in (webui.lora_dir / name).glob("*.safetensors"))
    assert kept and all(n.startswith(f"{name}-0") for n in kept)   # finished epochs, no final file
    assert [os.path.basename(f) for f in st["files"]] == kept


def test_api_auth_guards_the_routes(tmp_path_factory):
    from .harness import WebUI
    w = WebUI(tmp_path_factory.mktemp("webui-auth"), extra_args="--api-auth tester:secret")
    w.prepare()
    w.start(ready_timeout=20, check=False)   # the start script's probe has no credentials
    try:
        t0 = time.time()
        while "Startup time" not in w.log():
            assert time.time() - t0 < 300, w.log()[-3000:]
            time.sleep(1)
        assert "Error executing callback" not in w.log(), w.log()[-3000:]
        status, _ = w.call("/lora-trainer/v1/status")
        assert status == 401
        import base64
        import urllib.request
        req = urllib.request.Request(w.url + "/lora-trainer/v1/status", headers={
            "Authorization": "Basic " + base64.b64encode(b"tester:secret").decode()})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["state"] == "idle"
    finally:
        w.stop()
