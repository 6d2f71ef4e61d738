"""Mixed precision: autocast for the model, fp32 LoRA weights, a grad scaler for fp16 (torch >= 2.1 shim)."""
from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self.dtype = DTYPES[mode]
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("mixed_precision = bf16 is not supported by this GPU: use fp16 (cards before RTX 30xx).")
        if self.dtype is not None:
            self._check_autocast()
        self.scaler = None
        if mode == "fp16":
            try:
                self.scaler = torch.amp.GradScaler(device.type)
            except (AttributeError, TypeError, RuntimeError):  # torch < 2.3: CUDA only
                self.scaler = torch.cuda.amp.GradScaler(enabled=device.type == "cuda")

    def _check_autocast(self) -> None:
        """Refuse a precision this torch cannot autocast to on this device (torch < 2.2: no fp16 on CPU)."""
        import warnings
        fix = (f"mixed_precision = {self.mode} is not supported on {self.device.type} by torch {torch.__version__}: "
               "use bf16 (or no) here.")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    pass
            except RuntimeError:
                raise UserError(fix) from None
        if any("not supported" in str(w.message) for w in caught):
            raise UserError(fix)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
