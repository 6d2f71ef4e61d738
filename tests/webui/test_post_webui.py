"""Issue 4 in a real WebUI v1.10.1 (CPU, the harness's tiny SD1 checkpoint): files written by the post
tools load with no unmatched key, and the guide's check holds: the merged checkpoint without a tag
renders the same image as the base checkpoint with ``<lora:x:1>``.

Runs our CLI (``python -m lora_trainer resize/merge/extract/combine``) in subprocesses, then drives the
WebUI's HTTP API with a fixed seed. Skips unless LORA_TRAINER_WEBUI_DIR is set.
"""
import re
import subprocess
import sys

import numpy as np
import pytest

from .harness import WebUI

MAKE_LORA = r"""
import sys, torch
from lora_trainer.io.lora_file import save_lora
from lora_trainer.ldm_host import load_checkpoint
from lora_trainer.networks.network import LoRANetwork
host = load_checkpoint(sys.argv[1])
for out, seed in zip(sys.argv[2:], range(100)):
    torch.manual_seed(seed)
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=8, alpha=4, conv_dim=4, conv_alpha=2)
    with torch.no_grad():
        for m in net.lora_modules():
            m.lora_up.weight.normal_(0, 0.05)
    name = out.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    sd = net.kohya_state_dict()
    if "badkey" in name:  # negative control: one key that matches no layer
        sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")}
        sd.update({"lora_unet_no_such_block_0_to_q" + k[len("lora_unet_down_blocks_0_attentions_0_proj_in"):]:
                   v.clone() for k, v in sd.items()})
    save_lora(out, sd, {"ss_network_module": "networks.lora", "ss_network_dim": "8",
              "ss_network_alpha": "4", "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_output_name": name,
              "ss_clip_skip": "1"}, "float")
"""

PROMPT = "a photo of a cat, highly detailed"


@pytest.fixture(scope="module")
def webui_post(tmp_path_factory):
    """A WebUI of our own (temporary home, free port), without the extension: only the Lora loader matters."""
    w = WebUI(tmp_path_factory.mktemp("webui-post-home"), install_extension=False)
    w.prepare()
    subprocess.run([w.python, str(w.harness / "make_tiny_sdxl.py")], env=w.env, check=True, capture_output=True,
                   timeout=600)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def _run(webui, *args):
    r = subprocess.run([sys.executable, *args], env=webui.cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _cli(webui, *args):
    return _run(webui, "-m", "lora_trainer", *map(str, args))


def _select(webui, title):
    status, r = webui.call("/sdapi/v1/options", {"sd_model_checkpoint": title})
    assert status == 200, r
    status, opts = webui.call("/sdapi/v1/options")
    assert opts["sd_model_checkpoint"].startswith(title.rsplit(".", 1)[0]), opts["sd_model_checkpoint"]


def test_post_tool_outputs_in_the_webui(webui_post, capsys):
    w = webui_post
    lora, ckpt_dir = w.lora_dir, w.checkpoint.parent
    lora.mkdir(parents=True, exist_ok=True)
    x, y = lora / "post_x.safetensors", lora / "post_y.safetensors"
    _run(w, "-c", MAKE_LORA, w.checkpoint, x, y, lora / "post_badkey.safetensors")
    merged = ckpt_dir / "tiny-sd1-post-merged.safetensors"
    reports = [
        _cli(w, "resize", "--model", x, "--save_to", lora / "post_x_resized.safetensors", "--new_rank", 32,
             "--dynamic_method", "sv_fro", "--dynamic_param", 0.9, "--save_precision", "bf16", "-q"),
        _cli(w, "resize", "--model", x, "--save_to", lora / "post_x_full.safetensors", "--new_rank", 8, "-q"),
        _cli(w, "merge", "--model", w.checkpoint, "--loras", f"{x}:1", "--save_to", merged),
        _cli(w, "extract", "--model_org", w.checkpoint, "--model_tuned", merged, "--save_to",
             lora / "post_x_extracted.safetensors", "--dim", 8, "--conv_dim", 4, "-q"),
        _cli(w, "combine", "--loras", f"{x}:1", f"{y}:0.5", "--save_to", lora / "post_xy.safetensors"),
        _cli(w, "check", "-q", lora / "post_x_resized.safetensors", lora / "post_x_extracted.safetensors"),
    ]
    assert "verdict: DAMAGED" not in reports[-1]
    assert w.call("/sdapi/v1/refresh-loras", {})[0] == 200
    assert w.call("/sdapi/v1/refresh-checkpoints", {})[0] == 200
    names = {item["name"] for item in w.call("/sdapi/v1/loras")[1]}
    assert {"post_x", "post_y", "post_x_resized", "post_x_full", "post_x_extracted", "post_xy"} <= names
    assert any(m["model_name"] == merged.stem for m in w.call("/sdapi/v1/sd-models")[1])

    log_start = len(w.log())
    _select(w, "tiny-sd1.safetensors")
    base, _ = w.txt2img(PROMPT)
    img = {tag: w.txt2img(f"{PROMPT} {tag}")[0] for tag in (
        "<lora:post_x:1>", "<lora:post_x_full:1>", "<lora:post_x_resized:1>", "<lora:post_x_extracted:1>",
        "<lora:post_x:1> <lora:post_y:0.5>", "<lora:post_xy:1>")}
    _select(w, merged.name)
    merged_img, info = w.txt2img(PROMPT)
    _select(w, "tiny-sd1.safetensors")
    w.txt2img(f"{PROMPT} <lora:post_badkey:1>")
    log = w.log()[log_start:]

    def diff(a, b):
        return float(np.abs(a - b).mean()), float(np.abs(a - b).max())

    x_img = img["<lora:post_x:1>"]
    numbers = {"x vs base": diff(x_img, base), "merged vs x": diff(merged_img, x_img),
               "full-rank resize vs x": diff(img["<lora:post_x_full:1>"], x_img),
               "sv_fro 0.9 resize vs x": diff(img["<lora:post_x_resized:1>"], x_img),
               "extracted vs x": diff(img["<lora:post_x_extracted:1>"], x_img),
               "combined vs x+0.5y": diff(img["<lora:post_xy:1>"], img["<lora:post_x:1> <lora:post_y:0.5>"])}
    with capsys.disabled():
        print("\n".join(["", *reports[:5], *(f"{k}: mean |diff| {m:.3f}, max {mx:.0f} (of 255)"
                                            for k, (m, mx) in numbers.items())]))
    assert numbers["x vs base"][0] > 1.0, "the LoRA must visibly change the image for the checks to mean anything"
    assert "tiny-sd1-post-merged" in info
    # the guide's check: merged model, no tag == base model + <lora:x:1>
    assert numbers["merged vs x"][0] < 0.5 and numbers["merged vs x"][1] <= 8
    assert numbers["full-rank resize vs x"][0] < 0.5
    assert numbers["combined vs x+0.5y"][0] < 0.5
    for tag in ("<lora:post_x_resized:1>", "<lora:post_x_extracted:1>"):
        assert diff(img[tag], x_img)[0] < diff(base, x_img)[0], tag  # closer to x than the base is
    bad = [line for line in log.splitlines()
           if ("didn't match keys" in line and "post_badkey" not in line) or "Networks with errors" in line
           or "Traceback" in line or "Lora not found" in line or re.search(r"Network \S+ layer \S+:", line)]
    assert not bad, "\n".join(bad[:20])
    # the negative control proves unmatched keys would have been seen (the WebUI logs them at DEBUG only)
    assert re.search(r"post_badkey\.safetensors didn't match keys: .*no_such_block", log), log[-3000:]


def test_sdxl_extract_and_merge_in_the_webui(webui_post):
    """SDXL naming (LDM UNet names, lora_te1 / lora_te2 with fused OpenCLIP attention): a LoRA extracted
    from a changed tiny SDXL loads with no unmatched key, and merging it back renders the same image."""
    import torch
    from safetensors.torch import load_file, save_file
    from lora_trainer.post.checkpoint_keys import lora_targets
    w = webui_post
    ckpt_dir, lora = w.checkpoint.parent, w.lora_dir
    base = ckpt_dir / "tiny-sdxl.safetensors"
    sd = load_file(str(base))
    g = torch.Generator().manual_seed(0)
    for t in lora_targets({k: tuple(v.shape) for k, v in sd.items()}, "sdxl", conv=True):
        view = sd[t.key][t.rows[0]:t.rows[1]] if t.rows else sd[t.key]
        m = view.reshape(view.shape[0], -1)
        m += torch.randn(m.shape[0], 4, generator=g) @ torch.randn(4, m.shape[1], generator=g) * (0.12 / m.shape[1] ** 0.5)
    tuned = ckpt_dir.parent / "tuned-sdxl.safetensors"  # outside the checkpoint folder
    save_file(sd, str(tuned))
    xl, merged = lora / "post_xl.safetensors", ckpt_dir / "tiny-sdxl-post-merged.safetensors"
    _cli(w, "extract", "--model_org", base, "--model_tuned", tuned, "--save_to", xl, "--dim", 4, "--conv_dim", 4,
         "--clamp_quantile", 1, "-q")
    _cli(w, "resize", "--model", xl, "--save_to", lora / "post_xl_resized.safetensors", "--new_rank", 32,
         "--dynamic_method", "sv_fro", "--dynamic_param", 0.9, "--save_precision", "bf16", "-q")
    _cli(w, "merge", "--model", base, "--loras", xl, "--save_to", merged)
    assert w.call("/sdapi/v1/refresh-loras", {})[0] == 200 and w.call("/sdapi/v1/refresh-checkpoints", {})[0] == 200
    log_start = len(w.log())
    _select(w, base.name)
    plain, _ = w.txt2img(PROMPT)
    with_tag, info = w.txt2img(f"{PROMPT} <lora:post_xl:1>")
    resized, _ = w.txt2img(f"{PROMPT} <lora:post_xl_resized:1>")
    _select(w, merged.name)
    merged_img, _ = w.txt2img(PROMPT)
    _select(w, "tiny-sd1.safetensors")
    log = w.log()[log_start:]
    assert "post_xl" in info and np.abs(with_tag - plain).mean() > 1.0
    assert np.abs(merged_img - with_tag).mean() < 0.5 and np.abs(merged_img - with_tag).max() <= 8
    assert np.abs(resized - with_tag).mean() < np.abs(plain - with_tag).mean()
    bad = [line for line in log.splitlines() if "didn't match keys" in line or "Networks with errors" in line
           or "Traceback" in line or re.search(r"Network \S+ layer \S+:", line)]
    assert not bad, "\n".join(bad[:20])
