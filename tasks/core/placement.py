"""Where a loaded model's layers live: one device, split over several (GPUs, then CPU, then disk), and
whether it is read through quantized layers.

A model bigger than one GPU is split by accelerate's ``device_map``: a worker with
``gpus_per_worker: N > 1`` sees N GPUs (Ray sets CUDA_VISIBLE_DEVICES) and gets the layers balanced
over them; ``model_options.max_memory`` caps each device and sends what does not fit to CPU memory and
then to disk. Hooks, collection, scoring, trials and refinement need nothing else: inputs go to the
embedding's device, accelerate moves each layer's inputs to that layer's device, and every hook moves
its direction to the tensor it acts on (tasks/core/hooks.py). The same path runs on CPU with a model
split between CPU memory and disk offload, which is how it is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections import Counter
from typing import Any

import torch

from tasks.core.config import ModelOptions, Quantization
from tasks.core.errors import CompalignError


def _max_memory(opts: ModelOptions) -> dict[int | str, str] | None:
    if not opts.max_memory:
        return None

    def size(value: object) -> int | str:  # accelerate takes bytes as an int, or a string with a unit
        return int(value) if str(value).isdigit() else str(value)

    return {int(k) if str(k).isdigit() else str(k): size(v) for k, v in opts.max_memory.items()}


def _quantization_config(opts: ModelOptions, device: torch.device, dtype: torch.dtype):
    if opts.quantization == Quantization.none:
        return None
    if device.type != "cuda":
        raise CompalignError(
            f"model_options.quantization={opts.quantization} runs on CUDA only (bitsandbytes kernels) and "
            f"this worker's device is {device}; use model_options.quantization=none on CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CompalignError(
            f"model_options.quantization={opts.quantization} needs bitsandbytes: pip install bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if opts.quantization == Quantization.bnb_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def placement_options(opts: ModelOptions, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that place (and quantize) the model; empty: load it whole
    and move it to ``device``."""
    out: dict[str, Any] = {}
    quantization = _quantization_config(opts, device, dtype)
    max_memory = _max_memory(opts)
    several_gpus = device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1
    if max_memory is not None:
        out["device_map"] = "auto"
        out["max_memory"] = max_memory
        # Safetensors weights are read in place, so the folder usually stays empty; a temporary one is
        # removed with the model (load_model).
        out["offload_folder"] = opts.offload_folder or tempfile.mkdtemp(prefix="compalign-offload-")
    elif several_gpus:
        out["device_map"] = "balanced"
    elif quantization is not None:
        # bitsandbytes quantizes while placing, and a quantized model cannot be moved with .to()
        out["device_map"] = {"": device}
    if quantization is not None:
        out["quantization_config"] = quantization
    return out


def placement_summary(model) -> str:
    """``"12 modules on 0, 12 modules on 1, 2 modules on disk"``: how a split model's modules were placed."""
    device_map = getattr(model, "hf_device_map", None) or {}
    counts = Counter(str(device) for device in device_map.values())
    if not counts:
        return f"all on {next(model.parameters()).device}"
    return ", ".join(f"{n} modules on {device}" for device, n in sorted(counts.items()))
