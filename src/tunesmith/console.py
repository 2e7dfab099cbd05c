"""The console every part of tunesmith prints to: stderr, so stdout stays for what a command outputs
(`tunesmith data check`, `generate`, `predict`). The lowest layer holds it, so data and models print
without importing training."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
