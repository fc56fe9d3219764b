"""Plain-PyTorch references of every op, computed in the caller's dtype or (for test
oracles) in float64.  Slow and memory-hungry on purpose: they materialise everything.
Tests and benchmarks import them from here; nothing else should.
"""
from __future__ import annotations

import torch

__all__: list[str] = []
