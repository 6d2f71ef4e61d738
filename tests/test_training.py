import json

import pytest
import torch

from lora_trainer.errors import ConfigError, DatasetError, TrainingDiverged, UserError
from lora_trainer.io.lora_file import load_lora
from lora_trainer.run import build_data, train
from lora_trainer.train.progress import Callbacks, Commands
from lora_trainer.train.validation import validation_loss

from conftest import state_hash


def _val(host, cfg, network=None):
    data = build_data(cfg)
    data.cache_latents(host.encode_images, "", False)
    caps = [it.caption for it in data.items]
    return validation_loss(host, data.latents, caps, max_token_length=cfg.max_token_length,
                           clip_skip=cfg.clip_skip, network=network)


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
def test_training_lowers_fixed_seed_validation_loss(kind, sd1_host, sd2v_host, tiny_cfg):
    host = sd1_host if kind == "sd1" else sd2v_host
    assert host.prediction_type == ("epsilon" if kind == "sd1" else "v")
    cfg = tiny_cfg.replace(max_train_epochs=4, learning_rate=2e-3, text_encoder_lr=1e-3, network_dim=8,
                           network_alpha=8.0)
    before_hash = state_hash(host)
    before = _val(host, cfg)
    after = {}
    result = train(cfg, host, before_restore=lambda net: after.setdefault("v", _val(host, cfg, net)))
    assert after["v"] < before * 0.97, (before, after)
    assert state_hash(host) == before_hash          # model bitwise as found, requires_grad too
    assert [p.name for p in result.files] == [f"t-00000{i}.safetensors" for i in range(1, 5)] + ["t.safetensors"]
    assert len(result.epoch_losses) == 4 and all(l == l for _, l in result.epoch_losses)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_paths_train_and_save(precision, sd1_host, tiny_cfg):
    cfg = tiny_cfg.replace(mixed_precision=precision, save_precision=precision, max_train_epochs=1)
    h = state_hash(sd1_host)
    try:
        result = train(cfg, sd1_host)
    except UserError as e:  # torch < 2.2 has no fp16 autocast on the CPU: refused before any work
        assert f"mixed_precision = {precision} is not supported on cpu" in str(e)
        assert state_hash(sd1_host) == h
        pytest.skip(str(e))
    sd, meta = load_lora(result.final_file)
    want = torch.float16 if precision == "fp16" else torch.bfloat16
    assert all(v.dtype == want for k, v in sd.items() if "lora_" in k)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)  # it trained
    assert meta["ss_mixed_precision"] == precision
    assert state_hash(sd1_host) == h


def test_gradient_checkpointing_gives_the_same_step(sd1_host, tiny_cfg):
    outs = []
    for gc in (False, True):
        cfg = tiny_cfg.replace(gradient_checkpointing=gc, max_train_epochs=1, seed=5)
        r = train(cfg, sd1_host)
        outs.append(load_lora(r.final_file)[0])
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-6)


def test_same_seed_same_result_and_text_encoder_only(sd1_host, tiny_cfg):
    r1 = train(tiny_cfg.replace(max_train_epochs=1, output_name="a"), sd1_host)
    r2 = train(tiny_cfg.replace(max_train_epochs=1, output_name="b"), sd1_host)
    a, b = load_lora(r1.final_file)[0], load_lora(r2.final_file)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    r3 = train(tiny_cfg.replace(max_train_epochs=1, network_train_text_encoder_only=True, output_name="te"), sd1_host)
    keys = load_lora(r3.final_file)[0].keys()
    assert keys and all(k.startswith("lora_te_") for k in keys)
    r4 = train(tiny_cfg.replace(max_train_epochs=1, network_train_unet_only=True, output_name="u"), sd1_host)
    assert all(k.startswith("lora_unet_") for k in load_lora(r4.final_file)[0])


def test_accumulation_steps_limit_and_features_run(sd1_host, tiny_cfg):
    cfg = tiny_cfg.replace(max_train_epochs=None, max_train_steps=5, gradient_accumulation_steps=2,
                           noise_offset=0.05, multires_noise_iterations=3, min_snr_gamma=5.0,
                           scale_weight_norms=1.0, network_dropout=0.1, max_token_length=150, clip_skip=2,
                           caption_dropout_rate=0.1, caption_tag_dropout_rate=0.1,
                           network_args=["conv_dim=2", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.1"],
                           lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=0.2,
                           cache_latents=False)
    r = train(cfg, sd1_host)
    assert r.steps_done == 5
    sd, meta = load_lora(r.final_file)
    assert any("resnets" in k for k in sd)  # LoCon layers
    assert meta["ss_network_args"] and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert meta["ss_max_token_length"] == "150" and meta["ss_clip_skip"] == "2"


def test_stop_keeps_finished_epochs_and_restores_model(sd1_host, tiny_cfg):
    commands = Commands()
    h = state_hash(sd1_host)

    def on_progress(p):
        if p.epoch == 2 and p.phase == "training" and p.step > 0:
            commands.request_stop()

    r = train(tiny_cfg.replace(max_train_epochs=4), sd1_host, callbacks=Callbacks(on_progress), commands=commands)
    assert r.stopped and r.final_file is None
    assert [p.name for p in r.files] == ["t-000001.safetensors"]
    assert state_hash(sd1_host) == h


def test_exception_mid_run_restores_model(sd1_host, tiny_cfg):
    h = state_hash(sd1_host)

    def boom(p):
        pass

    class Boom(Exception):
        pass

    calls = {"n": 0}
    orig = sd1_host.denoise

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom()
        return orig(*a, **k)

    sd1_host.denoise = failing
    try:
        with pytest.raises(Boom):
            train(tiny_cfg, sd1_host)
    finally:
        del sd1_host.denoise
    assert state_hash(sd1_host) == h
    assert all("forward" not in m.__dict__ for m in sd1_host.unet.modules())


def test_diverged_network_is_never_saved(sd1_host, tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(learning_rate=1e30, text_encoder_lr=1e30, max_grad_norm=0.0, max_train_epochs=2,
                           optimizer_type="AdamW")
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        train(cfg, sd1_host)
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*tmp"))


def test_save_every_n_and_prune_last_n(sd1_host, tiny_cfg):
    r = train(tiny_cfg.replace(max_train_epochs=5, save_every_n_epochs=2, save_last_n_epochs=2), sd1_host)
    out = sorted(p.name for p in (r.final_file.parent).glob("*.safetensors"))
    assert out == ["t-000004.safetensors", "t-000005.safetensors", "t.safetensors"]
    assert [p.name for p in r.files] == ["t-000004.safetensors", "t-000005.safetensors", "t.safetensors"]


def test_bad_settings_refused_before_any_work(sd1_host, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="network_dim = 0"):
        train(tiny_cfg.replace(network_dim=0), sd1_host)
    with pytest.raises(DatasetError, match="does not exist"):
        train(tiny_cfg.replace(train_data_dir=str(tmp_path / "missing")), sd1_host)
    assert not (tmp_path / "out").exists()


def test_samples_are_written_and_a_failing_sample_never_stops_saving(sd1_host, tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(sample_prompts="trigger_a, red circle --w 64 --h 64 --s 3 --d 7",
                           sample_every_n_epochs=1, max_train_epochs=1)
    r = train(cfg, sd1_host)
    assert len(r.samples) == 1 and r.samples[0].is_file()

    def broken(*a, **k):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(sd1_host, "sample", broken)
    r = train(cfg.replace(output_name="s2"), sd1_host)
    assert r.final_file.is_file() and any("sampler exploded" in w for w in r.warnings)


def test_tensorboard_logs(sd1_host, tiny_cfg, tmp_path):
    r = train(tiny_cfg.replace(logging_dir=str(tmp_path / "logs"), log_prefix="run-", max_train_epochs=1), sd1_host)
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(runs[0]))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "loss/current" in tags and "loss/epoch" in tags and "lr/unet" in tags and "lr/textencoder" in tags
    assert len(ea.Scalars("loss/current")) == r.steps_done


def test_models_built_with_ldm_checkpointing_still_train_every_lora(tmp_path, tiny_cfg):
    """Real SD yamls say use_checkpoint: True; ldm's checkpoint would drop the LoRA weights' gradients."""
    from lora_trainer import tiny
    from lora_trainer.ldm_host import LDMHost
    host = LDMHost(tiny.build_model("sd1", tmp_path, use_checkpoint=True))
    flags = [m for m in host.unet.modules() if getattr(m, "checkpoint", None) is True]
    assert flags  # BasicTransformerBlocks carry ldm's checkpoint flag
    r = train(tiny_cfg.replace(max_train_epochs=1, network_train_unet_only=True), host)
    sd = load_lora(r.final_file)[0]
    attn = [k for k in sd if "attentions" in k and k.endswith("lora_up.weight")]
    assert attn and all(sd[k].abs().max() > 0 for k in attn)   # every transformer-block LoRA trained
    assert all(m.checkpoint is True for m in flags)              # and the model's flags are back


def test_run_reports_memory_and_keeps_the_model_storage(sd1_host, tiny_cfg):
    """No second copy of any model weight: every UNet/TE/VAE tensor keeps its storage through the run."""
    from lora_trainer.memory import storage_fingerprint
    before = storage_fingerprint(sd1_host.modules())
    progress = None

    def grab(p):
        nonlocal progress
        progress = p
    train(tiny_cfg.replace(max_train_epochs=1), sd1_host, callbacks=Callbacks(grab))
    assert progress.memory["model_storage_unchanged"] is True
    assert progress.memory["model_storage"] == before == storage_fingerprint(sd1_host.modules())
    assert progress.memory["rss_peak_mb"] >= progress.memory["rss_idle_mb"] > 0
    assert "same storage, no copy" in progress.memory_text


def test_torch_compile_option_traces_the_patched_unet(sd1_host, tiny_cfg):
    """torch_compile with the eager backend (tracing only: inductor takes minutes on a CPU) trains as the
    plain run does, and the UNet's forward is put back afterwards."""
    a = train(tiny_cfg.replace(max_train_epochs=1, output_name="plain", seed=7), sd1_host)
    b = train(tiny_cfg.replace(max_train_epochs=1, output_name="comp", seed=7, torch_compile=True,
                               dynamo_backend="eager"), sd1_host)
    sa, sb = load_lora(a.final_file)[0], load_lora(b.final_file)[0]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)
    assert "forward" not in sd1_host.unet.__dict__
