"""nn.Module wrappers: each forward only calls the matching function in `functional`."""
from __future__ import annotations

import torch

from . import functional as F

__all__: list[str] = []
