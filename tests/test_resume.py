"""Resume: a run stopped (or killed) part-way continues from its training state and ends with the same
file as a run with the same seed that never stopped; a state that does not fit is refused with why."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError, UserError
from lora_trainer.io.lora_file import load_lora
from lora_trainer.run import train
from lora_trainer.train import state as train_state
from lora_trainer.train.progress import Commands

from conftest import state_hash

ROOT = Path(__file__).resolve().parents[1]


class StopAfter(Commands):
    """Asks to stop at the n-th point the loop polls (a Stop pressed part-way through an epoch)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def stop_requested(self) -> bool:
        self.n -= 1
        return self.n <= 0


def _same(a: Path, b: Path, tol=1e-5):
    sa, sb = load_lora(a)[0], load_lora(b)[0]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stop_mid_epoch_then_resume_equals_an_unbroken_run(accumulation, sd1_host, tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(max_train_epochs=3, gradient_accumulation_steps=accumulation, shuffle_caption=True,
                           caption_tag_dropout_rate=0.2, save_state_every_n_minutes=0.0, save_precision="float")
    ref = train(cfg.replace(output_dir=str(tmp_path / "ref")), sd1_host)
    h = state_hash(sd1_host)
    first = train(cfg, sd1_host, commands=StopAfter(3))          # stops inside epoch 1
    assert first.stopped and first.final_file is None
    st = train_state.load(train_state.state_path(cfg.output_dir, cfg.output_name))
    assert st["batches_done"] > 0 and not st["finished"]           # a point inside an epoch
    resumed = train(cfg.replace(resume="auto"), sd1_host)
    assert not resumed.stopped and resumed.final_file is not None
    _same(resumed.final_file, ref.final_file)
    assert [p.name for p in resumed.files] == [p.name for p in ref.files]
    assert state_hash(sd1_host) == h
    assert train_state.load(train_state.state_path(cfg.output_dir, cfg.output_name))["finished"]


def test_resume_allows_more_epochs_and_refuses_what_does_not_fit(sd1_host, tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(max_train_epochs=1)
    train(cfg, sd1_host)
    with pytest.raises(UserError, match="already finished its 1 epochs"):
        train(cfg.replace(resume="auto"), sd1_host)
    more = train(cfg.replace(resume="auto", max_train_epochs=2), sd1_host)    # a later stop: fine
    assert [p.name for p in more.files] == ["t-000001.safetensors", "t-000002.safetensors", "t.safetensors"]
    with pytest.raises(ConfigError, match="network's shape differs"):
        train(cfg.replace(resume="auto", max_train_epochs=3, network_dim=8), sd1_host)
    with pytest.raises(ConfigError, match="settings changed.*learning_rate"):
        train(cfg.replace(resume="auto", max_train_epochs=3, learning_rate=0.5), sd1_host)
    cap = next(Path(cfg.train_data_dir).rglob("*.txt"))
    cap.write_text(cap.read_text() + ", edited", encoding="utf-8")
    with pytest.raises(ConfigError, match="dataset differs"):
        train(cfg.replace(resume="auto", max_train_epochs=3), sd1_host)
    with pytest.raises(UserError, match="No training state"):
        train(cfg.replace(resume=str(tmp_path / "nothing.trainstate")), sd1_host)
    with pytest.raises(UserError, match="holds no .trainstate"):
        train(cfg.replace(resume=str(tmp_path)), sd1_host)


def test_state_file_is_not_a_lora_file_and_temp_files_are_cleaned(sd1_host, tiny_cfg):
    out = Path(tiny_cfg.output_dir)
    out.mkdir(parents=True)
    (out / ".t-000001.safetensors.abc123.tmp").write_bytes(b"half a file")   # left by a crash
    train(tiny_cfg.replace(max_train_epochs=1), sd1_host)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["t-000001.safetensors", "t.safetensors", "t.trainstate"]
    # the WebUI's Lora list takes .safetensors, .pt, .ckpt (and .bin / .pth in some versions)
    assert not any(n.endswith((".pt", ".ckpt", ".bin", ".pth")) for n in names)
    assert train_state.unfinished_runs(out) == []


def _cli(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_cli_resume_finishes_like_an_unbroken_run(tmp_path):
    from lora_trainer import tiny
    from lora_trainer.config import TrainConfig
    model_dir = tmp_path / "model"
    ckpt = tiny.save_checkpoint(tiny.build_model("sd1", model_dir, seed=0), model_dir, "sd1")
    ds = tiny.make_dataset(tmp_path / "dataset")
    base = TrainConfig(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(ds), output_name="k",
                       resolution="64", min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=4.0,
                       learning_rate=1e-3, lr_scheduler="cosine", max_train_epochs=12, train_batch_size=1,
                       mixed_precision="no", max_token_length=75, save_precision="float", seed=3,
                       save_state_every_n_minutes=0.0)
    base.replace(output_dir=str(tmp_path / "ref")).save(tmp_path / "ref.toml")
    base.replace(output_dir=str(tmp_path / "run")).save(tmp_path / "run.toml")
    ref = _cli(["train", "--config", str(tmp_path / "ref.toml")])
    run = _cli(["train", "--config", str(tmp_path / "run.toml")])
    state_file = tmp_path / "run" / "k.trainstate"
    killed_at = None
    t0 = time.time()
    while run.poll() is None and time.time() - t0 < 300:
        if state_file.is_file():
            try:
                st = train_state.load(state_file)
            except UserError:
                st = {}
            if st.get("epoch", 0) >= 3:           # two epochs done and saved: kill it inside the third
                os.kill(run.pid, signal.SIGKILL)
                killed_at = st["epoch"]
                break
        time.sleep(0.02)
    run.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    assert not (tmp_path / "run" / "k.safetensors").exists()
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    res = _cli(["train", "--config", str(tmp_path / "run.toml"), "--resume"], {"LORA_TRAINER_LOG": "1"})
    out, err = res.communicate(timeout=600)
    assert res.returncode == 0, err
    _same(tmp_path / "run" / "k.safetensors", tmp_path / "ref" / "k.safetensors")
    # every epoch file exists once, and at most one epoch's work was redone
    assert sorted(p.name for p in (tmp_path / "run").glob("k-*.safetensors")) == \
        [f"k-{i:06d}.safetensors" for i in range(1, 13)]
    st = train_state.load(state_file)
    assert st["finished"] and st["epoch"] == 13
