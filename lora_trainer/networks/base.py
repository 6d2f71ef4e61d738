"""What every trainable network (plain LoRA, LyCORIS, DyLoRA) shares: modules registered under their
kohya names, grouped into text-encoder and UNet parts; multipliers; parameter groups; a context that
applies the network temporarily; checked loading of a saved file."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from ..errors import UserError


class NetworkBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.unet_names: List[str] = []
        self.te_names: List[str] = []
        self.applied = False

    # subclasses: apply() / remove()
    def apply(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def lora_modules(self) -> List[nn.Module]:
        return [self._modules[n] for n in self.te_names + self.unet_names]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.lora_modules():
            m.multiplier = float(multiplier)

    def param_groups(self, unet_lr: float, te_lr: float, train_unet: bool = True,
                     train_te: bool = True) -> List[dict]:
        groups = []
        if train_te and self.te_names:
            groups.append({"params": [p for n in self.te_names for p in self._modules[n].parameters()],
                           "lr": te_lr, "name": "textencoder"})
        if train_unet and self.unet_names:
            groups.append({"params": [p for n in self.unet_names for p in self._modules[n].parameters()],
                           "lr": unet_lr, "name": "unet"})
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        return groups

    @contextlib.contextmanager
    def applied_to_model(self, multiplier: Optional[float] = None) -> Iterator["NetworkBase"]:
        """Apply (if not applied) at ``multiplier`` for the block; put both back afterwards."""
        was_applied = self.applied
        old = [m.multiplier for m in self.lora_modules()]
        if multiplier is not None:
            self.set_multiplier(multiplier)
        if not was_applied:
            self.apply()
        try:
            yield self
        finally:
            if not was_applied:
                self.remove()
            for m, v in zip(self.lora_modules(), old):
                m.multiplier = v

    def kohya_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def _load_checked(self, sd: Dict[str, torch.Tensor], what: str, dims: str) -> None:
        """Load a saved file's tensors, refusing with the fix when keys or shapes differ."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise UserError(
                f"The file does not match {what}: {len(missing)} missing keys"
                f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unexpected)} unexpected"
                f"{' (e.g. ' + unexpected[0] + ')' if unexpected else ''}. Use the same {dims} and trained parts "
                "as the file, or start without network_weights.")
        bad = [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            raise UserError(f"The file's {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the network "
                            f"{tuple(own[bad[0]].shape)}: set {dims} to the file's.")
        result = self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
        left = [k for k in result.missing_keys if k in own]
        if left:
            raise UserError(f"Could not load {left[0]} from the file into {what}.")
