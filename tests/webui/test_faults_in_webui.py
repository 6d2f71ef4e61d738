"""Issue 10's faults in a real WebUI: CUDA out of memory (injected with LORA_TRAINER_FAULT, no GPU needed)
ends the run with a message naming what lowers memory, the model is restored bitwise, nothing is left in
the Lora folder, and the WebUI keeps generating."""
import time

from lora_trainer import tiny


def test_out_of_memory_in_a_webui_run(tmp_path_factory):
    from .harness import WebUI
    w = WebUI(tmp_path_factory.mktemp("webui-oom"))
    w.env["LORA_TRAINER_FAULT"] = "oom@step=3"
    w.prepare()
    ds = tiny.make_dataset(tmp_path_factory.mktemp("ds-oom") / "dataset")
    w.start()
    try:
        base, _ = w.txt2img("trigger_a, red circle")
        _, before = w.call("/lora-trainer/v1/model-hash")
        status, r = w.call("/lora-trainer/v1/train", {
            "train_data_dir": str(ds), "output_name": "oom", "resolution": "64", "min_bucket_reso": 64,
            "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4, "max_train_epochs": 2,
            "train_batch_size": 1, "mixed_precision": "no"})
        assert status == 200, r
        t0 = time.time()
        while w.call("/lora-trainer/v1/status")[1]["state"] in ("running", "stopping"):
            assert time.time() - t0 < 300
            time.sleep(0.3)
        _, st = w.call("/lora-trainer/v1/status")
        assert st["state"] == "error" and "ran out of memory" in st["error"] and "train_batch_size" in st["error"]
        _, after = w.call("/lora-trainer/v1/model-hash")
        assert after["sha256"] == before["sha256"]
        assert not (w.lora_dir / "oom").exists()
        again, _ = w.txt2img("trigger_a, red circle")      # the WebUI keeps generating, as before
        assert (again == base).all()
    finally:
        w.stop()
