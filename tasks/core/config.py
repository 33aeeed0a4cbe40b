"""Typed configuration: the sections every flow run has, declared once.

Values live in ``conf/*.yaml``; these dataclasses are the schema. ``RunConfig`` holds the shared sections
(model, model options, output, cache, MLflow, Ray, storage); ``tasks.core.concept_config.ConceptRunConfig``
adds a concept's (data, collect, direction, eval) and is what the abliterate and sweep flows extend
(``tasks/directions/config.py``, ``tasks/sweep/config.py``); the finetune flow extends ``RunConfig``
(``tasks/sft/config.py``). Each flow registers its schema in Hydra's ConfigStore and builds it once per run
with ``OmegaConf.to_object``, which runs every ``__post_init__`` check; a check's message names the key and
what to change. Choices are string Enums (checked once, by ``tasks.core.errors.choice``); ``Resources`` is
the one workers/CPUs/GPUs type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from tasks.core.errors import choice, require

PACKAGED_MODEL = "packaged:smollm2"
PACKAGED_REFUSAL_MODEL = "packaged:smollm2-refusal"
"""The packaged SmolLM2 with the shipped LoRA adapter that teaches it to refuse (tasks/data/fixtures)."""


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(StrEnum):
    none = "none"
    bnb_4bit = "bnb_4bit"
    bnb_8bit = "bnb_8bit"


class CheckpointTracking(StrEnum):
    artifact = "artifact"
    reference = "reference"
    none = "none"


@dataclass
class Resources:
    """Ray actors of one kind and what each reserves; sections that start workers extend it."""

    key: ClassVar[str] = "resources"
    """The config section's name, for messages."""
    workers: int = 2
    """Ray actors that each load the model once; the work is sharded over them."""
    cpus_per_worker: float = 1
    """CPUs reserved per worker (also its torch thread count)."""
    gpus_per_worker: float = 0
    """GPUs per worker (1 on a GPU cluster). N > 1 (a whole number) spans one worker's model over its N
    GPUs, layers balanced (for a model bigger than one GPU)."""

    def __post_init__(self) -> None:
        key, gpus = self.key, self.gpus_per_worker
        require(self.workers > 0, f"{key}.workers must be > 0, got {self.workers}")
        require(self.cpus_per_worker > 0, f"{key}.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        require(gpus >= 0, f"{key}.gpus_per_worker must be >= 0, got {gpus}")
        require(
            gpus <= 1 or float(gpus).is_integer(),
            f"{key}.gpus_per_worker above 1 must be a whole number of GPUs to span, got {gpus}",
        )


@dataclass
class ModelOptions:
    """How the model named by the top-level ``model`` key is loaded."""

    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id; part of the model's identity."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with a hub model. Off unless you trust the repository."""
    chat_template: str | None = None
    """Jinja chat template for a tokenizer that has none (otherwise the tokenizer's own is used)."""
    convert_cache: str | None = None
    """Directory where a GGUF model is converted to safetensors once (default ~/.cache/compalign/models)."""
    quantization: str = "none"
    """none, bnb_4bit or bnb_8bit: read the model through bitsandbytes' quantized layers (CUDA only) for
    collection, scoring, trials and evaluation. The saved edit always streams from the full-precision
    checkpoint, never from quantized weights."""
    max_memory: Any = None  # a mapping; typed Any so that model_options.max_memory={cpu:20GiB} overrides it
    """Split the model over devices with at most this much on each, as accelerate's max_memory:
    {"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}; layers that fit nowhere go to ``offload_folder`` on
    disk. Null: one device, or (a worker with gpus_per_worker > 1) every visible GPU, balanced."""
    offload_folder: str | None = None
    """Where layers beyond ``max_memory`` are offloaded (default: a temporary directory of the worker)."""

    def __post_init__(self) -> None:
        self.dtype = choice(Dtype, self.dtype, "model_options.dtype")
        self.quantization = choice(Quantization, self.quantization, "model_options.quantization")
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"model_options.device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        require(
            self.quantization == Quantization.none or self.device != "cpu",
            f"model_options.quantization={self.quantization} runs on CUDA only (bitsandbytes kernels); "
            "with model_options.device=cpu use model_options.quantization=none",
        )
        require(
            self.max_memory is None or isinstance(self.max_memory, dict),
            f"model_options.max_memory must be a mapping such as {{0: 70GiB, cpu: 200GiB}}, got {self.max_memory!r}",
        )
        for device, size in (self.max_memory or {}).items():
            require(
                str(device) in ("cpu", "disk") or str(device).isdigit(),
                f"model_options.max_memory keys are GPU numbers, cpu or disk, got {device!r}",
            )
            require(
                re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", str(size).strip(), re.IGNORECASE) is not None,
                f"model_options.max_memory.{device} must be bytes or a size such as 20GiB, got {size!r}",
            )


@dataclass
class RayConfig:
    """Where Ray work runs."""

    address: str | None = None
    """null starts a local Ray; auto joins the cluster this process runs on; or ray://host:10001."""
    num_cpus: int | None = None
    """CPUs of a local Ray (null: all of this machine's). Ignored when joining a cluster."""
    pack_on_one_node: bool = False
    """Place all of one model's workers on one node (STRICT_PACK placement group)."""
    log_to_driver: bool = True
    """Forward worker logs to the driver (warnings and above reach it either way)."""
    max_restarts: int = 3
    """Times Ray restarts a model-holding worker that died (OOM kill, lost node): the new process loads
    the model again and the calls that set the old one up are replayed on it. 0: a lost worker ends the run."""
    retries: int = 3
    """Times one call whose worker was lost runs again (a shard of a sharded call on another worker)."""

    def __post_init__(self) -> None:
        require(self.num_cpus is None or self.num_cpus > 0, f"ray.num_cpus must be > 0, got {self.num_cpus}")
        require(self.max_restarts >= 0, f"ray.max_restarts must be >= 0, got {self.max_restarts}")
        require(self.retries >= 0, f"ray.retries must be >= 0, got {self.retries}")


@dataclass
class MlflowConfig:
    """Run tracking."""

    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: sqlite:///file.db (default, in the working directory) or http://server:5000.
    The flows' conf takes MLFLOW_TRACKING_URI from the environment when it is set."""
    experiment: str = "compalign"
    """Experiment name; every run of a flow (and every run of a multirun) lands in it."""
    run_name: str | None = None
    """Run name (default: flow, concept and model)."""
    checkpoint: str = "reference"
    """How the saved checkpoint is tracked: artifact (copied into MLflow), reference (its URI as a tag
    and a small JSON artifact) or none."""
    artifact_location: str | None = None
    """Where a new experiment stores its artifacts (s3://bucket/mlflow, written by this process with its
    own credentials); null: the store's default (./mlruns beside a sqlite store, or the server's
    --artifacts-destination, proxied through it). Only applies when the experiment is created."""

    def __post_init__(self) -> None:
        self.checkpoint = choice(CheckpointTracking, self.checkpoint, "mlflow.checkpoint")


@dataclass
class StorageConfig:
    """Credentials and endpoint for fsspec URLs (s3://...). Secrets are read from the environment."""

    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...); default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS."""
    s3_region: str | None = None
    """Region; default: AWS_DEFAULT_REGION or the bucket's."""


@dataclass
class OutputConfig:
    """Where the edited model goes."""

    uri: str | None = None
    """Local directory or fsspec URL (s3://bucket/prefix) of the checkpoint; null: checkpoints/<run id>."""
    save: bool = True
    """Save the orthogonalized model at all."""


@dataclass
class CacheConfig:
    """Content-addressed store of collected activation sums (keyed by model weights, prompts, positions, dtype)."""

    uri: str | None = "~/.cache/compalign/activations"
    """Local directory or fsspec URL (s3://bucket/cache); null turns the cache off."""


@dataclass
class RunConfig:
    """The sections every flow run has."""

    model: str | None = None
    """packaged:smollm2[-refusal], a hub id, a directory with a safetensors checkpoint, or a .gguf file."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
