"""Issue 10's real-host check for resume: the WebUI is stopped in the middle of a run, started again,
the run is resumed through the API (what the tab's Resume button calls) and finishes; the model is
bitwise as before; the Lora list never shows a state or temporary file."""
import time

import numpy as np

from lora_trainer import tiny


def _names(w):
    w.call("/sdapi/v1/refresh-loras", {})
    _, loras = w.call("/sdapi/v1/loras")
    return {l["name"] for l in loras}, {l["path"] for l in loras}


def test_webui_restart_mid_run_then_resume(tmp_path_factory):
    from .harness import WebUI
    w = WebUI(tmp_path_factory.mktemp("webui-resume"))
    w.prepare()
    ds = tiny.make_dataset(tmp_path_factory.mktemp("ds-resume") / "dataset")
    cfg = {"train_data_dir": str(ds), "output_name": "rs", "resolution": "64", "min_bucket_reso": 64,
           "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4, "max_train_epochs": 40,
           "train_batch_size": 1, "mixed_precision": "no", "save_state_every_n_minutes": 0}
    w.start()
    try:
        _, before = w.call("/lora-trainer/v1/model-hash")
        status, r = w.call("/lora-trainer/v1/train", cfg)
        assert status == 200, r
        t0 = time.time()
        while len(w.call("/lora-trainer/v1/status")[1]["files"]) < 2:
            assert time.time() - t0 < 300
            time.sleep(0.2)
        names, paths = _names(w)
        assert not [p for p in paths if not p.endswith(".safetensors")], paths   # no state/temp file listed
        assert w.call("/lora-trainer/v1/status")[1]["state"] == "running"
    finally:
        w.stop()                      # the WebUI goes away in the middle of the run
    assert (w.lora_dir / "rs" / "rs.trainstate").is_file()
    assert not (w.lora_dir / "rs" / "rs.safetensors").exists()
    w.start()
    try:
        _, runs = w.call("/lora-trainer/v1/unfinished")
        mine = [r for r in runs["runs"] if r["output_name"] == "rs"]
        assert mine and mine[0]["epoch"] >= 2, runs
        status, r = w.call("/lora-trainer/v1/resume", {"output_name": "rs"})
        assert status == 200, r
        t0 = time.time()
        while True:
            _, st = w.call("/lora-trainer/v1/status")
            if st["state"] not in ("running", "stopping"):
                break
            names, paths = _names(w)
            assert not [p for p in paths if not p.endswith(".safetensors")], paths
            assert time.time() - t0 < 600
            time.sleep(0.5)
        assert st["state"] == "done", st.get("error")
        files = sorted(p.name for p in (w.lora_dir / "rs").glob("*.safetensors"))
        assert files == sorted([f"rs-{i:06d}.safetensors" for i in range(1, 41)] + ["rs.safetensors"])
        _, after = w.call("/lora-trainer/v1/model-hash")
        assert after["sha256"] == before["sha256"]
        _, runs = w.call("/lora-trainer/v1/unfinished")
        assert not [r for r in runs["runs"] if r["output_name"] == "rs"]
        status, r = w.call("/lora-trainer/v1/resume", {"output_name": "rs"})
        assert status == 400 and "nothing to resume" in r["error"]
        base, _ = w.txt2img("trigger_a, red circle")
        start = len(w.log())
        with_lora, _ = w.txt2img("trigger_a, red circle <lora:rs:1>")
        assert np.abs(with_lora - base).mean() > 0.1
        assert "didn't match keys" not in w.log()[start:]
    finally:
        w.stop()
