"""The calculator: parameters, FLOPs and memory per GPU of dense and MoE transformers.

Pure functions over a typed ``ModelSpec`` (no torch, no devices):

    spec = preset("mixtral-8x7b")  or  from_hf_config(json.load(...))  or  ModelSpec(...)
    count_params(spec)                       -> ParamCount (by component, total, active)
    forward_flops(spec, seq_len)             -> FlopCount per token, by component
    training_flops_per_token(spec, seq_len, checkpointing)
    inference_flops(spec, prompt_tokens, output_tokens, batch) -> InferenceFlops
    training_memory(spec, Parallel(...), TrainSetup(...))  -> TrainingMemory per GPU
    inference_memory(spec, Parallel(...), InferSetup(...)) -> InferenceMemory per GPU
    layer_memory(d_model=..., strategy=Strategy(...), ...) -> LayerMemory of one MoE layer

Every formula is written in the docstring of the module that computes it.
"""

from adaptive_moe.calc.flops import (
    FlopCount,
    InferenceFlops,
    RunEstimate,
    forward_flops,
    inference_flops,
    measured_device_flops,
    mfu,
    training_flops_per_token,
)
from adaptive_moe.calc.hf import SUPPORTED_MODEL_TYPES, from_hf_config, load_hf_config
from adaptive_moe.calc.layer_memory import LayerMemory, layer_memory
from adaptive_moe.calc.memory import (
    InferenceMemory,
    InferSetup,
    Parallel,
    TrainingMemory,
    TrainSetup,
    inference_memory,
    training_memory,
)
from adaptive_moe.calc.model import MLASpec, ModelSpec
from adaptive_moe.calc.params import ParamCount, count_params
from adaptive_moe.calc.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "FlopCount",
    "InferSetup",
    "InferenceFlops",
    "InferenceMemory",
    "LayerMemory",
    "MLASpec",
    "ModelSpec",
    "Parallel",
    "ParamCount",
    "RunEstimate",
    "TrainSetup",
    "TrainingMemory",
    "count_params",
    "forward_flops",
    "from_hf_config",
    "inference_flops",
    "inference_memory",
    "layer_memory",
    "load_hf_config",
    "measured_device_flops",
    "mfu",
    "preset",
    "training_flops_per_token",
    "training_memory",
]
