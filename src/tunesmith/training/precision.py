"""Mixed precision: autocast for the forward; for fp16 a loss scaler (an overflowed step is skipped and the
scale halved). Its state goes into every checkpoint, so a resumed run scales as the killed one would have.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


class Precision:
    """Autocast and loss scaling. bf16 goes through accelerate; fp16 owns a GradScaler on every
    device, CPU included, where accelerate would silently fall back to fp32."""

    def __init__(self, mode: str, accelerator):
        self.accelerator = accelerator
        self.device_type = accelerator.device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        if self.scaler is not None:
            return torch.autocast(self.device_type, dtype=torch.float16)
        return self.accelerator.autocast()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clipping and the finiteness check see true gradients

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def skipped(self) -> None:
        if self.scaler is not None:
            self.scaler.update()  # after an overflow this halves the scale

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
