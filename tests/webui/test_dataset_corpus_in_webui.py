"""Issue 10, item 3, in a real WebUI: a dataset scraped from the web (a truncated JPEG, a caption in cp1251,
an animated GIF) trains around its bad files through POST /lora-trainer/v1/train with the warnings shown;
a dataset with no usable image is refused with 400 and the message, leaving nothing in the Lora folder."""
import io
import os
import time

from PIL import Image

from lora_trainer import tiny

CFG = {"resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4,
       "learning_rate": 1e-3, "lr_scheduler": "constant", "max_train_epochs": 1, "train_batch_size": 2,
       "mixed_precision": "no"}

TRUNCATED = ("skipped 3_redcircle/half.jpg: truncated: the file ends before the image does (an interrupted download "
             "or copy): download it again, or remove it")
CP1251 = ("1 caption file is not UTF-8 and was read as Windows-1251 (Cyrillic) (e.g. 3_redcircle/img0.txt: "
          "'trigger_a, красный круг'): check that the text is right, and re-save it as UTF-8: 3_redcircle/img0.txt.")
GIF = ("skipped 3_redcircle/anim.gif: an animated GIF (3 frames): GIF is not a training format (png, jpg, jpeg, webp, "
       "bmp): save the frame you want as PNG, or remove it")


def _truncated_jpeg(path):
    b = io.BytesIO()
    Image.radial_gradient("L").resize((256, 192)).convert("RGB").save(b, "JPEG", quality=92)
    path.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])


def _animated_gif(path):
    frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def _wait_done(webui, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, st = webui.call("/lora-trainer/v1/status")
        if st["state"] not in ("running", "stopping"):
            return st
        time.sleep(0.5)
    raise AssertionError("training did not finish")


def test_a_scraped_dataset_trains_around_its_bad_files(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    concept = ds / "3_redcircle"
    _truncated_jpeg(concept / "half.jpg")
    (concept / "img0.txt").write_bytes("trigger_a, красный круг".encode("cp1251"))   # img0 had no caption
    _animated_gif(concept / "anim.gif")
    log_start = len(webui.log())
    status, r = webui.call("/lora-trainer/v1/train", dict(CFG, train_data_dir=str(ds), output_name="scraped"))
    assert status == 200, r
    st = _wait_done(webui)
    assert st["state"] == "done", st.get("error")
    assert [os.path.basename(f) for f in st["files"]] == ["scraped-000001.safetensors", "scraped.safetensors"]
    # the run logged each warning in the WebUI's console (a user's log), with no traceback
    log = webui.log()[log_start:]
    for line in (TRUNCATED, CP1251, GIF):
        assert line in log, log[-3000:]
    assert "Traceback" not in log and "image file is truncated" not in log
    for line in (TRUNCATED, CP1251, GIF):
        assert line in st["warnings"], st["warnings"]


def test_a_dataset_without_a_usable_image_is_refused_and_leaves_no_folder(webui, tmp_path):
    concept = tmp_path / "dataset" / "3_broken"
    concept.mkdir(parents=True)
    _truncated_jpeg(concept / "half.jpg")
    _animated_gif(concept / "anim.gif")
    status, r = webui.call("/lora-trainer/v1/train", dict(CFG, train_data_dir=str(tmp_path / "dataset"),
                                                          output_name="nothingusable"))
    assert status == 400, r
    assert r["error"].startswith(f"No usable images in {tmp_path / 'dataset'}'s concept folders"), r["error"]
    assert "\n  - 3_broken/anim.gif: an animated GIF (3 frames)" in r["error"]
    assert "\n  - 3_broken/half.jpg: truncated: the file ends before the image does" in r["error"]
    assert "Traceback" not in r["error"]
    assert not (webui.lora_dir / "nothingusable").exists()
    _, st = webui.call("/lora-trainer/v1/status")
    assert st["output_name"] != "nothingusable"   # no run was started
