"""Data parallel through accelerate: 2 processes on the CPU (gloo), each on its share of every epoch's
batches, gradients averaged, identical networks at the end, exactly one set of files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_share_the_epochs_and_end_with_one_network(tmp_path):
    pytest.importorskip("accelerate")
    from lora_trainer import tiny
    from lora_trainer.config import TrainConfig
    ckpt = tiny.save_checkpoint(tiny.build_model("sd1", tmp_path / "model", seed=0), tmp_path / "model", "sd1")
    ds = tiny.make_dataset(tmp_path / "dataset")
    TrainConfig(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(ds), output_dir=str(tmp_path / "out"),
                output_name="dp", resolution="64", min_bucket_reso=64, max_bucket_reso=128, network_dim=4,
                network_alpha=4.0, max_train_epochs=2, train_batch_size=1, mixed_precision="no",
                max_token_length=75).save(tmp_path / "cfg.toml")
    trace = tmp_path / "trace.jsonl"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LORA_TRAINER_TRACE=str(trace),
               ACCELERATE_USE_CPU="1")   # CPU processes: accelerate's multi-process launcher with gloo
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_trainer", "train",
                        "--config", str(tmp_path / "cfg.toml")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "data parallel: 2 processes" in r.stdout
    assert r.stdout.count("saved ") == 3                      # the main process alone reports and writes
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    batches = {(d["rank"], d["epoch"]): d["batches"] for d in records if "batches" in d}
    assert set(batches) == {(0, 1), (1, 1), (0, 2), (1, 2)}
    from lora_trainer.run import build_data
    data = build_data(TrainConfig.load(tmp_path / "cfg.toml"))
    for epoch in (1, 2):
        full = [b.indices for b in data.epoch_batches(epoch)]     # the epoch as one process would train it
        a, b = batches[(0, epoch)], batches[(1, epoch)]
        assert len(full) == 15 and len(a) == len(b) == 8          # one batch wrapped around to even the shares
        assert a == full[0::2] and b == full[1::2] + full[:1]     # different batches, together the whole epoch
    nets = {d["rank"]: d["network"] for d in records if "network" in d}
    assert set(nets) == {0, 1} and nets[0] == nets[1]         # averaged gradients: the same network
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["dp-000001.safetensors", "dp-000002.safetensors", "dp.safetensors", "dp.trainstate"]
