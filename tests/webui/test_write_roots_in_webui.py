"""Issue 10, item 5 in a real WebUI: what a request may write.

- Files a run saves (epoch files, card sidecars, previews, training state, samples) get the mode a plain
  ``open(path, "w")`` gives under the same umask (the WebUI process inherits this one's), not 0600.
- ``output_dir``, ``logging_dir`` and an on-disk latent cache outside the Lora folder are refused with
  400 and the fix, and nothing is created: plain paths, ``..`` and a symlink inside the Lora folder that
  leads out. The opt-in settings cannot be switched on through ``/sdapi/v1/options``.
- With the settings on (written to the WebUI's config.json before it starts): a folder named in
  *Folders training runs may write to* is accepted, and *Allow training runs to write anywhere* is
  honoured while the WebUI is local, and ignored (400, the reason named) when it listens on the network
  (``--server-name``) without ``--enable-insecure-extension-access``.
"""
import json
import os
import stat
import time

import pytest

from lora_trainer import tiny
from lora_trainer.dataset.latent_cache import CACHE_DIR_NAME
from lora_trainer.webui.write_roots import ANYWHERE_KEY, ROOTS_KEY

from .harness import WebUI

TRAIN = "/lora-trainer/v1/train"
CFG = {"resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4,
       "learning_rate": 1e-3, "text_encoder_lr": 1e-3, "lr_scheduler": "constant", "max_train_epochs": 1,
       "train_batch_size": 2, "mixed_precision": "no", "keep_tokens": 1}


def _wait_done(webui, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, st = webui.call("/lora-trainer/v1/status")
        if st["state"] not in ("running", "stopping"):
            return st
        time.sleep(0.5)
    raise AssertionError("training did not finish")


def _train(webui, cfg):
    status, r = webui.call(TRAIN, cfg)
    assert status == 200, r
    st = _wait_done(webui)
    assert st["state"] == "done", st.get("error")
    return st


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_saved_files_get_the_mode_of_a_plain_open_file(webui, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    want = _mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~umask
    ds = tiny.make_dataset(tmp_path / "dataset")
    _train(webui, dict(CFG, train_data_dir=str(ds), output_name="modes",
                       sample_prompts="trigger_a, red circle --w 64 --h 64 --s 2", sample_every_n_epochs=1))
    out = webui.lora_dir / "modes"
    saved = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in saved}
    assert {"modes.safetensors", "modes.json", "modes.trainstate"} <= names, names
    assert any(p.parent.name == "sample" for p in saved), names
    assert {p.name: oct(_mode(p)) for p in saved} == {p.name: oct(want) for p in saved}
    assert _mode(out) == 0o777 & ~umask


def test_writes_outside_the_lora_folder_are_refused_and_nothing_is_created(webui, tmp_path):
    ds = tiny.make_dataset(tmp_path / "dataset")
    evil, outside = tmp_path / "evil", tmp_path / "outside"
    outside.mkdir()
    link = webui.lora_dir / "wr_link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    escape = webui.lora_dir / ".." / ".." / "wr_escape"
    cases = [
        ({"output_dir": str(evil / "deep")}, f"output_dir {str(evil / 'deep')!r} is outside"),
        ({"logging_dir": str(evil / "logs")}, f"logging_dir {str(evil / 'logs')!r}"),
        ({"logging_dir": str(webui.lora_dir), "log_prefix": "../../wr_logs-"}, "log_prefix"),
        ({"output_dir": str(escape)}, f"resolves to {os.path.realpath(escape)}"),
        ({"output_dir": str(link / "run")}, f"resolves to {os.path.realpath(outside / 'run')}"),
        ({"cache_latents": True, "cache_latents_to_disk": True}, "cache_latents_to_disk"),
    ]
    for extra, needle in cases:
        status, r = webui.call(TRAIN, dict(CFG, train_data_dir=str(ds), output_name="wr_refused", **extra))
        assert status == 400, (extra, r)
        assert needle in r["error"] and "Settings → LoRA Trainer" in r["error"], (extra, r["error"])
    assert not evil.exists() and not list(outside.iterdir())
    assert not os.path.exists(escape) and not list(webui.home.glob("wr_logs-*"))
    assert not (webui.lora_dir / "wr_refused").exists()
    assert not list(ds.rglob(CACHE_DIR_NAME))
    _, st = webui.call("/lora-trainer/v1/status")
    assert st["state"] not in ("running", "stopping")
    # the opt-in settings are closed to the API (restrict_api): a request cannot open the door itself
    webui.call("/sdapi/v1/options", {ANYWHERE_KEY: True, ROOTS_KEY: str(tmp_path)})
    _, opts = webui.call("/sdapi/v1/options")
    assert opts.get(ANYWHERE_KEY) is False and opts.get(ROOTS_KEY) == ""
    status, r = webui.call(TRAIN, dict(CFG, train_data_dir=str(ds), output_name="wr_refused",
                                       output_dir=str(evil / "deep")))
    assert status == 400 and not evil.exists()
    link.unlink()


@pytest.fixture(scope="module")
def opted_in(tmp_path_factory):
    """A WebUI whose settings (config.json, written before it starts) name an extra folder and allow
    writing anywhere."""
    home = tmp_path_factory.mktemp("webui-write-roots")
    extra = tmp_path_factory.mktemp("extra-root")
    w = WebUI(home)
    w.prepare()
    (home / "data").mkdir(parents=True, exist_ok=True)
    (home / "data" / "config.json").write_text(json.dumps({ROOTS_KEY: str(extra), ANYWHERE_KEY: True}))
    w.start()
    try:
        yield w, extra
    finally:
        w.stop()


def test_extra_folders_and_the_opt_in_local_and_on_the_network(opted_in, tmp_path):
    w, extra = opted_in
    _, opts = w.call("/sdapi/v1/options")
    assert opts.get(ANYWHERE_KEY) is True and opts.get(ROOTS_KEY) == str(extra)
    ds = tiny.make_dataset(tmp_path / "dataset")
    st = _train(w, dict(CFG, train_data_dir=str(ds), output_name="in_extra", output_dir=str(extra / "in_extra")))
    assert os.path.basename(st["files"][-1]) == "in_extra.safetensors" and (extra / "in_extra").is_dir()
    anywhere = tmp_path / "anywhere" / "deep"
    _train(w, dict(CFG, train_data_dir=str(ds), output_name="anyw", output_dir=str(anywhere)))
    assert (anywhere / "anyw.safetensors").is_file()
    # the same settings while the WebUI listens on the network without --enable-insecure-extension-access
    w.stop()
    exposed = WebUI(w.home, extra_args="--server-name 127.0.0.1")  # non-local for the WebUI, bound locally here
    exposed.start()
    try:
        elsewhere = tmp_path / "elsewhere"
        status, r = exposed.call(TRAIN, dict(CFG, train_data_dir=str(ds), output_name="exp", output_dir=str(elsewhere)))
        assert status == 400, r
        assert "is on but ignored" in r["error"] and "--enable-insecure-extension-access" in r["error"]
        assert not elsewhere.exists()
        _train(exposed, dict(CFG, train_data_dir=str(ds), output_name="exp", output_dir=str(extra / "exp")))
        assert (extra / "exp" / "exp.safetensors").is_file()
    finally:
        exposed.stop()
