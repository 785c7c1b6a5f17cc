"""The expert activations: the one table from a name (``config.Activation``) to its torch
function, used by the layer's shared expert, the kernels' torch paths and the Hugging
Face block readers."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor

from adaptive_moe.core.checks import choice
from adaptive_moe.core.config import ACTIVATIONS, Activation

ACTIVATION_FNS: Mapping[Activation, Callable[[Tensor], Tensor]] = types.MappingProxyType(
    {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
)


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The torch function of activation ``name``; ValueError naming the valid ones."""
    choice("activation", name, ACTIVATIONS)
    return ACTIVATION_FNS[name]  # type: ignore[index]
