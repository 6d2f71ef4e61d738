"""Each schedule reproduces its defining curve at its checkpoints (warm-up end, restarts, final value)
within 1e-9; custom schedulers by dotted path and the built-in CosineAnnealingWarmupRestarts take
their arguments; the lr-curve preview returns the same values and draws a PNG."""
from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.optim import create_schedule, lr_curve
from lora_trainer.optim.schedules import SCHEDULES

BASE = 2e-4


def _curve(name, total=20, warmup=4, steps=None, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": BASE}], lr=BASE)
    sched = create_schedule(name, opt, total_steps=total, warmup=warmup, **kw)
    out = []
    for _ in range(steps or total + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _near(a, b):
    assert abs(a - b) <= 1e-9 * max(1.0, abs(b)) + 1e-15, (a, b)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_warmup_is_linear_and_ends_at_the_base_rate(name):
    if name in ("constant", "piecewise_constant"):
        c = _curve(name)
        assert all(v == BASE for v in c)
        return
    c = _curve(name, total=20, warmup=4)
    for s in range(4):
        _near(c[s], BASE * s / 4)
    _near(c[4], BASE)


def test_linear_cosine_polynomial_end_values():
    T, W = 20, 4
    lin = _curve("linear", T, W)
    _near(lin[12], BASE * (T - 12) / (T - W))
    _near(lin[T], 0.0)
    cos = _curve("cosine", T, W)
    _near(cos[12], BASE * 0.5 * (1 + math.cos(math.pi * 0.5)))
    _near(cos[T], 0.0)
    _near(cos[T + 1], BASE * 0.5 * (1 + math.cos(math.pi * (T + 1 - W) / (T - W))))  # HF's rise after the end
    poly = _curve("polynomial", T, W, power=2.0)
    _near(poly[12], (BASE - 1e-7) * (1 - 8 / 16) ** 2 + 1e-7)
    _near(poly[T], 1e-7)
    _near(poly[T + 1], 1e-7)


def test_cosine_with_restarts_matches_the_reference_sequence():
    # research libs.md §6: diffusers/transformers give these for num_cycles=3, warmup 2, 10 steps
    ref = [0, .5, 1, .691, .146, .962, .5, .038, .854, .309, 0, 0]
    c = _curve("cosine_with_restarts", total=10, warmup=2, num_cycles=3, steps=12)
    assert [round(v / BASE, 3) for v in c] == ref
    # restarts exactly at warmup + k * (total - warmup) / cycles
    c = _curve("cosine_with_restarts", total=28, warmup=4, num_cycles=4)
    for k in range(4):
        _near(c[4 + 6 * k], BASE)
    _near(c[28], 0.0)


def test_constant_with_warmup_min_lr_inverse_sqrt_wsd_piecewise():
    c = _curve("constant_with_warmup", 20, 5)
    _near(c[2], BASE * 2 / 5)
    assert all(v == BASE for v in c[5:])
    c = _curve("cosine_with_min_lr", 20, 4, scheduler_args={"min_lr_rate": 0.1})
    _near(c[4], BASE)
    _near(c[20], BASE * 0.1)
    c = _curve("inverse_sqrt", 20, 4)
    _near(c[16], BASE / math.sqrt(16 / 4))
    c = _curve("warmup_stable_decay", 20, 4, scheduler_args={"num_decay_steps": 6, "min_lr_ratio": 0.1})
    _near(c[13], BASE)            # stable until 20 - 6
    _near(c[17], BASE * (0.9 * (1 - 3 / 6) + 0.1))
    _near(c[20], BASE * 0.1)
    c = _curve("piecewise_constant", 20, 0, scheduler_args={"step_rules": "1:5,0.5:10,0.1"})
    assert [c[0], c[5], c[9], c[10]] == [BASE, BASE * 0.5, BASE * 0.5, BASE * 0.1]


def _cawr(s, W, T, C, df, g, d, ground=True):
    ramp = 1.0 if s >= W else (s if ground else s + 1) / W
    t = max(0, s - W)
    k, u = divmod(t, T)
    peak = d ** k * g ** t
    floor = peak * df
    if k and u < C:
        return ramp * (floor + (peak - floor) * u / C)
    start = C if k else 0
    return ramp * (floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (u - start) / (T - start))))


def test_cosine_annealing_warmup_restarts_checkpoints():
    W, T, C, df, g, d = 10, 30, 8, 0.5, 0.995, 0.9
    args = {"T_0": T, "gamma_min_lr": g, "decay": d, "down_factor": df, "warmup_steps": W, "cycle_warmup": C,
            "init_lr_ground": True}
    c = _curve("constant", total=130, warmup=0, scheduler_type="CosineAnnealingWarmupRestarts",
               scheduler_args=args, steps=131)
    _near(c[0], 0.0)                                   # init_lr_ground: starts from 0
    _near(c[5], BASE * 0.5)                            # half-way up the warm-up
    _near(c[W], BASE)                                  # warm-up end = the first peak
    _near(c[W + T - 1], BASE * _cawr(W + T - 1, W, T, C, df, g, d))
    for k in (1, 2, 3):
        s = W + k * T                                  # a restart starts at the floor, no jump
        _near(c[s], BASE * d ** k * g ** (k * T) * df)
        _near(c[s + C], BASE * d ** k * g ** (k * T + C))   # and climbs back to the peak in cycle_warmup steps
    _near(c[130], BASE * _cawr(130, W, T, C, df, g, d))
    for s in range(131):
        _near(c[s], BASE * _cawr(s, W, T, C, df, g, d))
    # the guide's dotted name selects the same built-in, without the package
    c2 = _curve("constant", total=130, warmup=0, scheduler_type="cosine_annealing_warmup.CosineAnnealingWarmupRestarts",
                scheduler_args=args, steps=131)
    assert c2 == c


def test_cawr_defaults_come_from_the_run():
    # no T_0: all steps / num_cycles; no warmup_steps: lr_warmup_steps; not grounded: starts at 1/warmup
    c = _curve("constant", total=24, warmup=4, num_cycles=2, scheduler_type="CosineAnnealingWarmupRestarts",
               scheduler_args={"down_factor": 0.0})
    _near(c[0], BASE * 1 / 4)
    _near(c[4], BASE)
    _near(c[14], BASE)                      # restart at 4 + 20/2, straight to the peak (cycle_warmup 0)
    _near(c[13], BASE * 0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_custom_scheduler_by_dotted_path():
    c = _curve("cosine", total=12, warmup=0, scheduler_type="torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
               scheduler_args={"T_0": 4, "eta_min": 0.0}, steps=9)
    _near(c[0], BASE)
    _near(c[2], BASE * 0.5)
    _near(c[4], BASE)       # restart
    _near(c[8], BASE)
    with pytest.raises(UserError, match="takes"):
        _curve("cosine", scheduler_type="torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
               scheduler_args={"T0": 4})
    with pytest.raises(UserError, match="cannot import"):
        _curve("cosine", scheduler_type="no_such_module.Sched")


def test_adafactor_schedule_needs_adafactor():
    with pytest.raises(UserError, match="AdaFactor"):
        _curve("adafactor")
    assert "optimizer_type = AdaFactor" in " ".join(
        TrainConfig(optimizer_type="Lion", lr_scheduler="adafactor").problems(need_dataset=False, need_output=False))


def test_lr_curve_preview_and_png(tmp_path, dataset_dir):
    from lora_trainer.cli import main
    from lora_trainer.lr_plot import curve_for_config, render_png, total_steps_for
    cfg = TrainConfig(train_data_dir=str(dataset_dir), output_dir=str(tmp_path / "o"), resolution="64",
                      min_bucket_reso=64, max_bucket_reso=128, train_batch_size=1, max_train_epochs=4,
                      learning_rate=1e-4, text_encoder_lr=5e-5, lr_scheduler="cosine_with_restarts",
                      lr_scheduler_num_cycles=2, lr_warmup_steps=0.1)
    total = total_steps_for(cfg)
    assert total == 4 * (3 * 4 + 1 * 3)        # images x repeats x epochs / batch
    curves = curve_for_config(cfg)
    assert set(curves) == {"textencoder", "unet"} and len(curves["unet"]) == total
    ref = _curve("cosine_with_restarts", total=total, warmup=int(0.1 * total), num_cycles=2, steps=total)
    for a, b in zip(curves["unet"], ref):
        _near(a, b / BASE * 1e-4)
    img = render_png(curves, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    px = img.convert("RGB").getcolors(1 << 20)
    assert len(px) > 3                          # axes, text and two coloured curves were drawn
    cfg.save(tmp_path / "cfg.toml")
    assert main(["lr-plot", "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file()
    with pytest.raises(ConfigError):
        curve_for_config(cfg.replace(lr_scheduler="warmup_cosine"))
