"""Run in the WebUI's venv (sgm importable from its repositories/generative-models, diffusers installed):
the CLI's SDXL model code against sgm's own classes on the harness's tiny-sdxl checkpoint. Prints JSON:
max |difference| of the UNet output, crossattn and vector, and whether every key loaded strictly."""
import json
import sys

import torch


def main(ckpt: str) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from sgm.util import instantiate_from_config
    from lora_trainer.ldm_host import load_checkpoint
    yaml = ckpt[: -len(".safetensors")] + ".yaml"
    cfg = OmegaConf.load(yaml)
    sd = load_file(ckpt)
    p = cfg.model.params
    unet = instantiate_from_config(p.network_config).eval()
    unet.load_state_dict({k[22:]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, strict=True)
    for e in p.conditioner_config.params.emb_models:
        if "device" in e.get("params", {}) or e.target.endswith(("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")):
            e.params["device"] = "cpu"
    from lora_trainer.ldm_host import _text_encoder_from_config_only
    with _text_encoder_from_config_only():   # sgm's CLIP-L loads weights by name; the checkpoint has them
        cond = instantiate_from_config(p.conditioner_config).eval()
    cond.load_state_dict({k[12:]: v for k, v in sd.items() if k.startswith("conditioner.")}, strict=False)
    host = load_checkpoint(ckpt)   # our CLI path
    caps = ["trigger_a, red circle, simple background", "a blue square"]
    tid = torch.tensor([[64., 64, 0, 0, 64, 64], [96, 64, 0, 16, 64, 64]])
    batch = {"txt": caps, "original_size_as_tuple": tid[:, 0:2], "crop_coords_top_left": tid[:, 2:4],
             "target_size_as_tuple": tid[:, 4:6]}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = cond(batch)
        ours = host.encode_tokens(host.tokenize(caps, 75))
        ref_out = unet(x, timesteps=t, context=ref["crossattn"], y=ref["vector"])
        our_out = host.denoise(x, t, dict(ours, time_ids=tid))
    pooled_w = ours["pooled"].shape[1]
    print(json.dumps({
        "crossattn": (ref["crossattn"] - ours["crossattn"]).abs().max().item(),
        "pooled": (ref["vector"][:, :pooled_w] - ours["pooled"]).abs().max().item(),
        "unet": (ref_out - our_out).abs().max().item(),
        "scale": ref_out.abs().mean().item(),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
