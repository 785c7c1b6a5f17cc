"""The static inference path: when it runs (``config``), its device-side grouping and
expert compute (``rows``), its dispatcher (``static``) and its CUDA graphs (``graphs``).

``adaptive_moe.runtime.inference`` was one module before the runtime was split by
concern; its names stay importable from here."""

from adaptive_moe.runtime.inference.config import (
    COMPLETE_ROWS_KERNELS,
    DEVICE_OFFSET_KERNELS,
    InferenceConfig,
    default_inference_kernel,
)
from adaptive_moe.runtime.inference.graphs import GraphCache
from adaptive_moe.runtime.inference.rows import (
    StaticRows,
    balance_loss_static,
    combine_static,
    group_static,
    static_expert_mlp,
)
from adaptive_moe.runtime.inference.static import StaticDispatcher

__all__ = [
    "COMPLETE_ROWS_KERNELS",
    "DEVICE_OFFSET_KERNELS",
    "GraphCache",
    "InferenceConfig",
    "StaticDispatcher",
    "StaticRows",
    "balance_loss_static",
    "combine_static",
    "default_inference_kernel",
    "group_static",
    "static_expert_mlp",
]
