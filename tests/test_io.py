import errno
import hashlib
import json
import os
import stat
import struct

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.io import atomic
from lora_trainer.io.lora_file import NonFiniteWeights, load_lora, read_header, save_lora
from lora_trainer.run import train


def _addnet_hash_by_hand(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_saved_epochs_carry_kohya_metadata_and_webui_hashes(sd1_host, tiny_cfg):
    r = train(tiny_cfg.replace(max_train_epochs=2, training_comment="hello"), sd1_host)
    names = set()
    for path in r.files:
        _, meta = read_header(path)
        names.add(meta["ss_output_name"])
        assert meta["ss_output_name"] == path.stem
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _addnet_hash_by_hand(path)
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
        assert meta["ss_training_comment"] == "hello"
        assert meta["ss_resolution"] == "(64, 64)" and meta["ss_num_train_images"] == "15"
        assert json.loads(meta["ss_dataset_dirs"]) == {"1_bluesquare": {"n_repeats": 1, "img_count": 3},
                                                       "3_redcircle": {"n_repeats": 3, "img_count": 4}}
        tf = json.loads(meta["ss_tag_frequency"])
        assert tf["3_redcircle"]["trigger_a"] == 3 and tf["3_redcircle"]["redcircle"] == 1
        assert float(meta["ss_unet_lr"]) == 1e-3 and float(meta["ss_text_encoder_lr"]) == 5e-4
        assert all(isinstance(v, str) for v in meta.values())
    assert names == {"t-000001", "t-000002", "t"}  # distinct: the WebUI drops a shared alias
    eps = {read_header(p)[1]["ss_epoch"] for p in r.files}
    assert eps == {"1", "2"}


def test_v_model_metadata(sd2v_host, tiny_cfg):
    r = train(tiny_cfg.replace(max_train_epochs=1), sd2v_host)
    meta = read_header(r.final_file)[1]
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"


def test_nan_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteWeights):
        save_lora(tmp_path / "x.safetensors", {"a.lora_up.weight": torch.tensor([1.0, float("nan")])}, {})
    with pytest.raises(NonFiniteWeights):  # fp16 overflow on cast
        save_lora(tmp_path / "x.safetensors", {"a.lora_up.weight": torch.tensor([1e6])}, {}, "fp16")
    assert not list(tmp_path.iterdir())


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_lora(p, {"a.alpha": torch.tensor(1.0)}, {"v": "1"})
    before = p.read_bytes()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(UserError, match="disk is full"):
        save_lora(p, {"a.alpha": torch.tensor(2.0)}, {"v": "2"})
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_bad_files_get_clear_messages(tmp_path):
    (tmp_path / "text.safetensors").write_text("hello, I am not a model")
    with pytest.raises(UserError, match="not a safetensors file"):
        read_header(tmp_path / "text.safetensors")
    good = tmp_path / "g.safetensors"
    save_lora(good, {"a.lora_up.weight": torch.ones(64, 64)}, {})
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_lora(tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_header(tmp_path / "none.safetensors")


def test_tensors_sharing_storage_are_saved(tmp_path):
    base = torch.randn(4, 8)
    save_lora(tmp_path / "s.safetensors", {"a.lora_up.weight": base, "b.lora_up.weight": base[:2]}, {}, "float")
    sd, _ = load_lora(tmp_path / "s.safetensors")
    assert torch.equal(sd["b.lora_up.weight"], base[:2])


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """Every atomic write (LoRA files, configs, sidecars, states, latent cache, merged checkpoints) ends with
    the mode ``open(path, "w")`` gives under the process's umask (0o644 under 022), not mkstemp's 0o600;
    replacing a file keeps the mode it had."""
    from lora_trainer.config import TrainConfig
    from lora_trainer.post.checkpoint_keys import save_new_file
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
        save_lora(tmp_path / "sub" / "a.safetensors", {"a.alpha": torch.tensor(1.0)}, {})
        atomic.atomic_write_bytes(tmp_path / "b.json", b"{}")
        TrainConfig().save(tmp_path / "c.toml")
        save_new_file(tmp_path / "d.safetensors", {"w": torch.zeros(2)}, {})
        for name in ("sub/a.safetensors", "b.json", "c.toml", "d.safetensors"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want == 0o666 & ~umask, name
        assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o777 & ~umask
        os.chmod(tmp_path / "b.json", 0o640)  # a mode the user chose survives a rewrite
        atomic.atomic_write_bytes(tmp_path / "b.json", b"{ }")
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
        assert not list(tmp_path.rglob("*.tmp"))
    finally:
        os.umask(old)
