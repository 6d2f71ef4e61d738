"""Shared fixtures: tiny random SD models in the real LDM layout, built once per session, and
synthetic datasets. Nothing here mocks the model."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _host(kind, tiny_dir):
    from lora_trainer import tiny
    return tiny.host(kind, tiny_dir, seed=0)


@pytest.fixture(scope="session")
def sd1_host(tiny_dir):
    """A tiny SD1 (epsilon) host. Session-scoped: tests must leave it as they found it (restore())."""
    return _host("sd1", tiny_dir)


@pytest.fixture(scope="session")
def sd2v_host(tiny_dir):
    """A tiny SD2 v-prediction host (OpenCLIP text encoder)."""
    return _host("sd2-v", tiny_dir)


@pytest.fixture(scope="session")
def sdxl_host(tiny_dir):
    """A tiny SDXL (epsilon) host over a single-file sgm-layout checkpoint, loaded as the CLI loads one."""
    pytest.importorskip("diffusers")
    from lora_trainer import tiny
    return tiny.sdxl_host(tiny_dir, seed=0)


@pytest.fixture(scope="session")
def sdxlv_host(tiny_dir):
    """A tiny SDXL v-prediction host (VScaling in its yaml) with the zero-terminal-SNR schedule."""
    pytest.importorskip("diffusers")
    from lora_trainer import tiny
    return tiny.sdxl_host(tiny_dir, seed=0, v=True, zero_terminal_snr=True)


@pytest.fixture()
def dataset_dir(tmp_path):
    from lora_trainer import tiny
    return tiny.make_dataset(tmp_path / "dataset")


@pytest.fixture()
def tiny_cfg(tmp_path, dataset_dir):
    """A fast config for the tiny models."""
    from lora_trainer.config import TrainConfig
    return TrainConfig(train_data_dir=str(dataset_dir), output_dir=str(tmp_path / "out"), output_name="t",
                       resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64,
                       network_dim=4, network_alpha=4.0, learning_rate=1e-3, text_encoder_lr=5e-4,
                       lr_scheduler="constant", max_train_epochs=2, train_batch_size=2, mixed_precision="no",
                       max_token_length=75, save_precision="float", seed=1)


def state_hash(host) -> str:
    """SHA-256 over every UNet/TE/VAE tensor's bytes, plus requires_grad flags."""
    from lora_trainer.host import model_state_hash
    return model_state_hash(host.modules())


def forward_probe(host, seed=0):
    """(conditioning, UNet prediction) for fixed latents, timesteps and captions: compares model states."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        cond = host.encode_tokens(host.tokenize(["trigger_a, red circle", "a blue square"], 75), 1)
        pred = host.denoise(z, t, cond)
        if isinstance(cond, dict):  # SDXL: crossattn and pooled, side by side
            cond = torch.cat([cond["crossattn"].flatten(1), cond["pooled"]], dim=1)
        return cond, pred
