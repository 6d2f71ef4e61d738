"""Every optimizer name runs a few steps on a tiny real model: the loss moves, and the optimizer's
state dict round-trips (a reloaded optimizer takes the very same next step). Names whose package or
device support is missing here are skipped with the reason. Bad arguments and impossible choices
are refused before training, with the fix."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.optim import create_optimizer, eval_mode, known_names, recommended_args, train_mode
from lora_trainer.optim.optimizers import preflight, resolve
from lora_trainer.optim.setup import build, setting_problems

NAMES = known_names() + ["came_pytorch.CAME", "torch.optim.RAdam"]
LR = {"Lion": 1e-4, "Lion8bit": 1e-4, "PagedLion8bit": 1e-4, "SGDNesterov": 0.05, "SGDNesterov8bit": 0.05,
      "SGDScheduleFree": 0.05, "came_pytorch.CAME": 1e-3}


def _lr(name):
    spec = resolve(name)
    return 1.0 if spec.adaptive else LR.get(name, 2e-3)


@pytest.fixture(scope="module")
def batch(sd1_host):
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, 4, 8, 8), generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.tensor([200, 600])
    tokens = sd1_host.tokenize(["trigger_a, red circle", "trigger_b, blue square"], 75)
    return z, noise, t, tokens


def _loss(host, batch):
    z, noise, t, tokens = batch
    acp = host.alphas_cumprod
    a = acp[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
    cond = host.encode_tokens(tokens, 1)
    return torch.nn.functional.mse_loss(host.denoise(a * z + s * noise, t, cond), noise)


def _step(host, batch, opt):
    opt.zero_grad(set_to_none=True)
    loss = _loss(host, batch)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_trains_and_state_round_trips(name, sd1_host, batch):
    problems = preflight(name, {}, "cpu")
    if problems:
        pytest.skip(problems[0])
    host = sd1_host
    host.prepare()
    torch.manual_seed(0)
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=4)
    net.apply()
    try:
        with torch.no_grad():  # lora_up starts at 0: give it a start so every optimizer has a gradient to follow
            for m in net.lora_modules():
                m.lora_up.weight.normal_(0, 0.01)
        lr = _lr(name)
        groups = net.param_groups(lr, lr)
        opt = create_optimizer(name, groups, lr, {})
        train_mode(opt)
        with torch.no_grad():
            first = _loss(host, batch)
        for _ in range(7 if "RAdam" in name else 4):  # RAdam's rectified warm-up holds the first steps
            _step(host, batch, opt)
        with torch.no_grad(), eval_mode(opt):
            after = _loss(host, batch)
        assert torch.isfinite(after)
        assert abs(float(after) - float(first)) > 1e-7, f"{name}: the loss did not move ({first} -> {after})"

        # state dict round trip: a fresh optimizer loaded from the state takes the same next step
        state = copy.deepcopy(opt.state_dict())
        before = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _step(host, batch, opt)
        expected = {k: v.detach().clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            for k, p in net.state_dict(keep_vars=True).items():
                p.copy_(before[k])
        opt2 = create_optimizer(name, net.param_groups(lr, lr), lr, {})
        opt2.load_state_dict(state)
        train_mode(opt2)
        _step(host, batch, opt2)
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-7, msg=f"{name}: {k} differs after reload")
    finally:
        net.remove()
        host.restore()


def test_guide_defaults_are_offered_and_accepted():
    assert recommended_args("AdamW8bit") == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert recommended_args("Prodigy") == ["decouple=True", "weight_decay=0.01", "d_coef=2.0",
                                           "use_bias_correction=True", "safeguard_warmup=True"]
    assert recommended_args("DAdaptation") == ["decouple=True", "weight_decay=0.01", "betas=0.9,0.99"]
    from lora_trainer.config import parse_kv_args
    for name in ("AdamW", "Prodigy", "DAdaptAdam", "DAdaptation", "Lion"):
        args = parse_kv_args(recommended_args(name), "optimizer_args")
        problems = preflight(name, args, "cpu")
        if problems and "not installed" in problems[0]:
            continue
        assert problems == [], (name, problems)


def test_dadaptation_is_the_preprint_class():
    assert resolve("DAdaptation").name == "DAdaptAdamPreprint"
    assert resolve("dadaptation").target.endswith("DAdaptAdamPreprint")
    assert resolve("DAdaptAdanIP").target == "dadaptation.experimental:DAdaptAdanIP"


@pytest.mark.parametrize("args, expect", [
    (["betas=0.9"], "wants 2 numbers"),
    (["betass=0.9,0.99"], "has no argument 'betass'"),
    (["weight_decay=yes"], "wants a number"),
    (["amsgrad=1.5"], "True or False"),
    (["betas=0.9,2.0"], "Invalid beta"),
    (["lr=1e-3"], "learning_rate"),
    (["weight_decay"], "is not key=value"),
])
def test_bad_optimizer_args_are_refused_with_the_fix(args, expect):
    cfg = TrainConfig(optimizer_type="AdamW", optimizer_args=args)
    problems = cfg.problems(need_dataset=False, need_output=False) + setting_problems(cfg)
    assert any(expect in p for p in problems), problems


def test_unknown_and_missing_names_say_what_to_do():
    (p,) = setting_problems(TrainConfig(optimizer_type="AdamW9bit"))
    assert "unknown" in p and "AdamW8bit" in p and "dotted path" in p
    (p,) = setting_problems(TrainConfig(optimizer_type="no_such_package.FancyOpt"))
    assert "needs the package 'no-such-package'" in p and "pip install" in p and "AdamW" in p
    (p,) = setting_problems(TrainConfig(optimizer_type="SGDNesterov", optimizer_args=["nesterov=False"]))
    assert "remove it" in p


def test_bnb_cuda_only_versions_are_refused_on_cpu(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb, "__version__", "0.45.5")
    (p,) = preflight("AdamW8bit", {}, "cpu")
    assert "only on NVIDIA GPUs" in p and "AdamW" in p and "0.50" in p
    assert preflight("AdamW8bit", {}, "cuda") == []


def test_impossible_combinations_are_refused_before_training(sd1_host, tiny_cfg):
    from lora_trainer.run import train
    cases = [
        (dict(optimizer_type="AdamW", lr_scheduler="adafactor"), "works only with optimizer_type = AdaFactor"),
        (dict(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine"), "schedule-free"),
        (dict(optimizer_type="AdaFactor", lr_scheduler_type="CosineAnnealingWarmupRestarts"), "relative_step"),
        (dict(lr_scheduler="cosine_with_hard_restarts"), "is unknown"),
        (dict(lr_scheduler_type="CosineAnnealingWarmupRestarts", lr_scheduler_args=["T_O=100"]), "takes T_0"),
        (dict(optimizer_type="Prodigy", optimizer_args=["d_coef=two"]), "wants a number"),
    ]
    for changes, expect in cases:
        with pytest.raises(ConfigError) as e:
            train(tiny_cfg.replace(**changes), sd1_host)
        assert expect in str(e.value), (changes, str(e.value))
    assert not (tiny_cfg.output_dir and __import__("pathlib").Path(tiny_cfg.output_dir).exists() and
                any(__import__("pathlib").Path(tiny_cfg.output_dir).glob("*.safetensors")))


def test_adafactor_relative_step_gets_its_own_schedule():
    cfg = TrainConfig(optimizer_type="AdaFactor", lr_scheduler="cosine", learning_rate=1e-3)
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt, sched = build(cfg, [{"params": [p], "lr": 1e-3}], total_steps=10, warmup=0)
    assert type(sched).__name__ == "AdafactorSchedule"
    assert opt.defaults["relative_step"] is True
    cfg = cfg.replace(optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"],
                      lr_scheduler="constant_with_warmup")
    opt, sched = build(cfg, [{"params": [p], "lr": 1e-3}], total_steps=10, warmup=2)
    assert type(sched).__name__ == "LambdaLR" and opt.param_groups[0]["lr"] == 0.0


def test_schedule_free_train_and_eval_weights_differ_and_switch_back():
    pytest.importorskip("schedulefree")
    cfg = TrainConfig(optimizer_type="AdamWScheduleFree", lr_scheduler="constant", learning_rate=0.1)
    p = torch.nn.Parameter(torch.ones(3))
    opt, _ = build(cfg, [{"params": [p], "lr": 0.1}], total_steps=10, warmup=2)
    assert opt.param_groups[0]["warmup_steps"] == 2
    train_mode(opt)
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    y = p.detach().clone()
    with eval_mode(opt):
        x = p.detach().clone()
    assert not torch.equal(x, y)          # eval weights are the averaged ones
    torch.testing.assert_close(p.detach(), y)  # and training resumes on the training weights


def test_adaptive_optimizers_warn_when_unet_and_te_rates_differ(sd1_host, tiny_cfg, caplog):
    pytest.importorskip("prodigyopt")
    from lora_trainer.run import train
    cfg = tiny_cfg.replace(optimizer_type="Prodigy", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=0.5,
                           max_train_epochs=1)
    result = train(cfg, sd1_host)
    assert any("takes one learning rate" in w and "used for both" in w for w in result.warnings)
    assert result.steps_done > 0
