"""The in-memory type of a model's weights, declared once: parameter name to tensor."""

from __future__ import annotations

from typing import TypeAlias

import torch

Weights: TypeAlias = dict[str, torch.Tensor]
