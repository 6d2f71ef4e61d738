"""Where a run started in the WebUI may write (lora_trainer/webui/write_roots.py): the rules are plain
functions of a config and a policy, checked here on real folders and symlinks; the WebUI's settings and
command-line flags come in through a minimal stand-in for ``modules.shared`` (the real WebUI runs them in
tests/webui/test_write_roots_in_webui.py)."""
from __future__ import annotations

import os
import sys
import types

import pytest

from lora_trainer.config import TrainConfig
from lora_trainer.dataset.latent_cache import CACHE_DIR_NAME
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.webui.write_roots import (ANYWHERE_KEY, ROOTS_KEY, WritePolicy, check_path, check_writes,
                                            current_policy, parse_roots, write_problems)


@pytest.fixture()
def places(tmp_path):
    lora = tmp_path / "models" / "Lora"
    lora.mkdir(parents=True)
    extra = tmp_path / "runs"
    extra.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    return types.SimpleNamespace(lora=lora, extra=extra, outside=outside, policy=WritePolicy(lora, [extra]))


def _cfg(**kw):
    return TrainConfig(output_name="run", **kw)


def test_output_and_logging_dirs_under_the_allowed_roots_pass(places):
    for cfg in (_cfg(output_dir=str(places.lora / "run")), _cfg(output_dir=str(places.lora)),
                _cfg(output_dir=str(places.extra / "a" / "b"), logging_dir=str(places.extra / "logs"), log_prefix="x-"),
                _cfg(output_dir=str(places.lora / "x" / ".." / "y"))):
        assert write_problems(cfg, places.policy) == []


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_outside_dot_dot_and_symlinks_are_refused_with_the_value_and_the_fix(places):
    (places.lora / "link").symlink_to(places.outside, target_is_directory=True)
    cases = {
        str(places.outside / "deep"): "",
        str(places.lora / ".." / ".." / "evil"): "resolves to",
        str(places.lora / "link" / "run"): f"resolves to {places.outside.resolve() / 'run'}",
    }
    for value, extra in cases.items():
        (problem,) = write_problems(_cfg(output_dir=value), places.policy)
        assert f"output_dir {value!r}" in problem and extra in problem
        assert str(places.lora.resolve()) in problem and "Settings → LoRA Trainer" in problem
        assert "leave output_dir empty" in problem
    (problem,) = write_problems(_cfg(output_dir=str(places.lora / "r"), logging_dir=str(places.outside)), places.policy)
    assert problem.startswith(f"logging_dir {str(places.outside)!r}") and "leave logging_dir empty" in problem
    (problem,) = write_problems(_cfg(output_dir=str(places.lora / "r"), logging_dir=str(places.lora),
                                     log_prefix="../../evil-"), places.policy)
    assert "log_prefix '../../evil-'" in problem and "evil-<time>" in problem
    with pytest.raises(ConfigError, match="output_dir"):
        check_writes(_cfg(output_dir=str(places.outside)), policy=places.policy)
    assert not (places.outside / "deep").exists()


def test_the_opt_in_is_honoured_only_while_the_webui_is_local(places):
    cfg = _cfg(output_dir=str(places.outside / "deep"))
    on = WritePolicy(places.lora, anywhere=True)
    assert write_problems(cfg, on) == []
    exposed = WritePolicy(places.lora, anywhere=True, network_exposed=True)
    (problem,) = write_problems(cfg, exposed)
    assert "is on but ignored" in problem and "--enable-insecure-extension-access" in problem


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_latent_cache_on_disk_needs_an_allowed_dataset_folder(places):
    ds = places.outside / "dataset" / "5_cat"
    ds.mkdir(parents=True)
    images = [ds / "a.png", ds / "b.png"]
    out = str(places.lora / "run")
    (problem,) = write_problems(_cfg(output_dir=out, cache_latents=True, cache_latents_to_disk=True), places.policy,
                                images)
    assert f"latent cache to {os.path.join(os.path.realpath(ds), CACHE_DIR_NAME)!r}" in problem
    assert "cache_latents_to_disk = false" in problem
    assert write_problems(_cfg(output_dir=out, cache_latents=True, cache_latents_to_disk=False), places.policy,
                          images) == []
    assert write_problems(_cfg(output_dir=out, cache_latents=True, cache_latents_to_disk=True),
                          WritePolicy(places.lora, [places.outside / "dataset"]), images) == []
    # a concept folder inside an allowed dataset that links out is refused
    allowed_ds = places.extra / "dataset"
    allowed_ds.mkdir()
    (allowed_ds / "5_dog").symlink_to(ds, target_is_directory=True)
    assert write_problems(_cfg(output_dir=out, cache_latents=True, cache_latents_to_disk=True), places.policy,
                          [allowed_ds / "5_dog" / "a.png"])


def test_single_files_and_the_roots_setting(places):
    check_path("The config file", places.lora / "run" / "run.toml", places.policy)
    with pytest.raises(UserError, match="The config file .* outside"):
        check_path("The config file", places.outside / "x.toml", places.policy)
    assert parse_roots(" /a \n\n/b;/c\n") == [type(places.lora)("/a"), type(places.lora)("/b"),
                                                type(places.lora)("/c")]


@pytest.fixture()
def webui_shared(monkeypatch, places):
    """A stand-in for the WebUI's ``modules.shared`` (its options and command-line flags) and the Lora folder."""
    pkg = types.ModuleType("modules")
    shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lora_dir=str(places.lora)),
                                   opts=types.SimpleNamespace(**{ROOTS_KEY: f"{places.extra}\n", ANYWHERE_KEY: True}))
    pkg.shared = shared
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    return shared


def test_current_policy_reads_the_settings_and_the_webuis_network_gate(webui_shared, places):
    webui_shared.cmd_opts.disable_extension_access = False  # local: the opt-in counts
    p = current_policy()
    assert (p.lora_dir, p.extra_roots, p.anywhere_honoured) == (places.lora, [places.extra], True)
    webui_shared.cmd_opts.disable_extension_access = True   # --listen without --enable-insecure-extension-access
    assert current_policy().anywhere_honoured is False
    del webui_shared.cmd_opts.disable_extension_access      # older WebUI: its rule from the flags
    webui_shared.cmd_opts.server_name = "0.0.0.0"
    assert current_policy().network_exposed is True
    webui_shared.cmd_opts.enable_insecure_extension_access = True
    assert current_policy().network_exposed is False
