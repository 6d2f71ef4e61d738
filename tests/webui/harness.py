"""A real WebUI v1.10.1 for integration tests, driven through the harness scripts in
``../shared/webui-harness`` (tiny random checkpoints, CPU, offline).

Needs ``LORA_TRAINER_WEBUI_DIR`` (a v1.10.1 checkout with its venv); tests skip without it.
Optional: ``LORA_TRAINER_WEBUI_PYTHON`` (default ``$DIR/venv/bin/python``) and
``LORA_TRAINER_WEBUI_HARNESS`` (default ``<repo>/../shared/webui-harness``).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def webui_dir():
    d = os.environ.get("LORA_TRAINER_WEBUI_DIR")
    return Path(d) if d else None


def harness_dir() -> Path:
    return Path(os.environ.get("LORA_TRAINER_WEBUI_HARNESS", ROOT.parent / "shared" / "webui-harness"))


def webui_python(wd: Path) -> str:
    return os.environ.get("LORA_TRAINER_WEBUI_PYTHON", str(wd / "venv" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    def __init__(self, home: Path, *, install_extension: bool = True, extra_args: str = ""):
        self.dir = webui_dir()
        self.python = webui_python(self.dir)
        self.harness = harness_dir()
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, WEBUI_DIR=str(self.dir), WEBUI_PYTHON=self.python, HARNESS_HOME=str(self.home),
                        WEBUI_PORT=str(self.port), WEBUI_EXTRA_ARGS=extra_args)
        self.env.pop("PYTHONPATH", None)
        self.install_extension = install_extension

    # ------------------------------------------------------------ lifecycle
    def prepare(self) -> None:
        for script in ("make_hf_clip_cache.py", "make_tiny_sd1.py", "make_tiny_sdxl.py"):
            subprocess.run([self.python, str(self.harness / script)], env=self.env, check=True, capture_output=True,
                           timeout=600)
        if self.install_extension:
            ext = self.home / "data" / "extensions"
            ext.mkdir(parents=True, exist_ok=True)
            link = ext / "sd-webui-lora-trainer"
            if not link.exists():
                link.symlink_to(ROOT, target_is_directory=True)

    def start(self, ready_timeout: int = 300, check: bool = True) -> None:
        """``check=False``: for setups the start script cannot probe (--api-auth); wait yourself."""
        env = dict(self.env, WEBUI_START_TIMEOUT=str(ready_timeout))
        for attempt in range(3):
            r = subprocess.run(["bash", str(self.harness / "start_webui.sh")], env=env, capture_output=True,
                               text=True, timeout=ready_timeout + 120)
            # a start-up race in the WebUI itself: a request that lands between its middleware reset and
            # create_api() locks starlette's middleware stack ("Cannot add middleware after an application
            # has started"); the start script polls every 0.5 s, so about one start in four dies this way
            if r.returncode != 0 and "Cannot add middleware after an application has started" in self.log():
                self.stop()
                continue
            break
        if check and r.returncode != 0:
            raise RuntimeError(f"WebUI failed to start:\n{r.stdout}\n{r.stderr}\n{self.log()[-4000:]}")

    def stop(self) -> None:
        subprocess.run(["bash", str(self.harness / "stop_webui.sh")], env=self.env, capture_output=True, timeout=120)

    # ------------------------------------------------------------ helpers
    @property
    def lora_dir(self) -> Path:
        return self.home / "models" / "Lora"

    @property
    def checkpoint(self) -> Path:
        return self.home / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"

    def switch_checkpoint(self, stem: str) -> None:
        status, r = self.call("/sdapi/v1/options", {"sd_model_checkpoint": stem + ".safetensors"})
        assert status == 200, r
        _, opts = self.call("/sdapi/v1/options")
        assert str(opts.get("sd_model_checkpoint", "")).startswith(stem + "."), opts.get("sd_model_checkpoint")

    def log(self) -> str:
        p = self.home / "logs" / "webui.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    def call(self, path: str, payload=None, method=None, timeout: float = 600):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if payload is None else "POST"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def txt2img(self, prompt: str, seed: int = 1234, steps: int = 4, size: int = 64):
        status, r = self.call("/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, "steps": steps, "width": size,
                                                    "height": size, "sampler_name": "Euler", "cfg_scale": 5})
        assert status == 200, r
        import numpy as np
        from PIL import Image
        img = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
        return np.asarray(img.convert("RGB"), dtype=np.float32), r.get("info", "")

    def cli_env(self) -> dict:
        """Environment for running our CLI on the harness checkpoint (its CLIP tokenizer is in the harness HF cache)."""
        env = dict(os.environ, HF_HOME=str(self.home / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        return env
