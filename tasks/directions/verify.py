"""The check of a saved edit: the checkpoint as written gives the logits of the model that was edited (or
hooked) in memory, on a few prompts."""

from __future__ import annotations

import torch

from tasks.core.config import ModelOptions
from tasks.core.forward import last_logits
from tasks.core.model import LoadedModel, load_model
from tasks.core.worker import Worker


@torch.no_grad()
def _logits(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True).to(loaded.device)
    return last_logits(loaded.model, batch["input_ids"], batch["attention_mask"]).cpu()


def logits_loaded(worker: Worker, texts: list[str]) -> torch.Tensor:
    """Next-token logits of the worker's (edited) model at the end of each text, (texts, vocab) float32."""
    return _logits(worker.loaded, texts)


def checkpoint_logits(path: str, opts: ModelOptions, texts: list[str]) -> torch.Tensor:
    """Load the checkpoint at ``path`` and return its next-token logits on ``texts``, (texts, vocab)."""
    loaded = load_model(path, opts)
    return _logits(loaded, texts)
