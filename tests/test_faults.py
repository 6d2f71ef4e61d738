"""How a run ends when the machine fails it (faults injected with LORA_TRAINER_FAULT, no GPU or full disk
needed): out of GPU memory, a NaN loss, a full disk — each a message, the model restored, nothing
already written lost, no half-written file, no empty folder left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.errors import TrainingDiverged, UserError
from lora_trainer.run import train
from lora_trainer.train import state as train_state

from conftest import state_hash


def test_out_of_memory_is_a_message_and_leaves_nothing(sd1_host, tiny_cfg, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_FAULT", "oom@step=3")
    h = state_hash(sd1_host)
    with pytest.raises(UserError) as e:
        train(tiny_cfg, sd1_host)
    msg = str(e.value)
    assert "ran out of memory" in msg and "train_batch_size" in msg and "gradient_checkpointing" in msg
    assert "AdamW8bit" in msg and "cache_text_encoder_outputs" in msg
    assert e.value.__context__ is None          # the failed step's frames are not kept alive
    assert state_hash(sd1_host) == h            # restored
    assert not Path(tiny_cfg.output_dir).exists()   # the run created the folder, wrote nothing: removed


def test_nan_loss_stops_and_keeps_the_last_good_epoch(sd1_host, tiny_cfg, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_FAULT", "nan@loss=12")   # in epoch 2 (8 steps per epoch)
    h = state_hash(sd1_host)
    with pytest.raises(TrainingDiverged, match="NaN/Inf at step"):
        train(tiny_cfg.replace(max_train_epochs=3), sd1_host)
    out = Path(tiny_cfg.output_dir)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-000001.safetensors"]
    st = train_state.load(train_state.state_path(out, "t"))
    assert st["epoch"] == 2 and st["batches_done"] == 0       # the last good state: epoch 1's end
    assert state_hash(sd1_host) == h


def test_full_disk_keeps_the_previous_file_and_says_so(sd1_host, tiny_cfg, monkeypatch):
    out = Path(tiny_cfg.output_dir)
    out.mkdir(parents=True)
    previous = out / "t-000001.safetensors"
    previous.write_bytes(b"an earlier run's epoch file")
    monkeypatch.setenv("LORA_TRAINER_FAULT", "enospc@write=1")
    h = state_hash(sd1_host)
    with pytest.raises(UserError, match="disk is full.*intact"):
        train(tiny_cfg, sd1_host)
    assert previous.read_bytes() == b"an earlier run's epoch file"
    assert sorted(p.name for p in out.iterdir()) == ["t-000001.safetensors"]   # no temp file left
    assert state_hash(sd1_host) == h
