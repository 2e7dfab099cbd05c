"""Where tunesmith keeps its own files (model conversions, tokenized caches): $TUNESMITH_HOME, else
$XDG_CACHE_HOME/tunesmith, else ~/.cache/tunesmith. In the lowest layer: data and models both cache there."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunesmith"
    return Path(os.environ.get("TUNESMITH_HOME", default))
