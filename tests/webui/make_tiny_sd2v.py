"""Write a tiny random SD2 v-prediction checkpoint (+ its LDM yaml) that a real WebUI loads: the
OpenCLIP text tower is the harness's offline hub entry (hf-hub:harness/tiny-openclip-vit-bigG-14, width
32, as the UNet's context), the yaml says parameterization "v". Norm layers are randomised so the text
encoder's output mean is not 0 (the WebUI's emphasis divides by it). Run with HF_HOME = the harness's.
Usage: python make_tiny_sd2v.py OUT_DIR"""
import sys
from pathlib import Path

import torch


def main(out_dir: str) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from lora_trainer import tiny
    from lora_trainer.ldm_host import instantiate
    cfg = tiny.model_config("sd2-v")
    cond = cfg["model"]["params"]["cond_stage_config"]["params"]
    cond["arch"] = "hf-hub:harness/tiny-openclip-vit-bigG-14"
    cond.pop("device", None)
    torch.manual_seed(7)
    model = instantiate(cfg)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for p in model.model.diffusion_model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "tiny-sd2v.safetensors"))
    OmegaConf.save(OmegaConf.create(cfg), str(out / "tiny-sd2v.yaml"))


if __name__ == "__main__":
    main(sys.argv[1])
