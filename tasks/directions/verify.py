"""An edit seen through hooks, so that no worker holds a second, edited copy of its model: the evaluation
"after" runs on the unedited model with the edit's ablation hooks (equal to the orthogonalized weights,
tests/tasks/directions/test_orthogonalize.py), and the saved checkpoint is checked against the same hooked
model on a few prompts."""

from __future__ import annotations

import torch

from tasks.core.config import ModelOptions
from tasks.core.forward import last_logits
from tasks.core.hooks import intervene
from tasks.core.model import LoadedModel, load_model
from tasks.core.worker import Worker
from tasks.directions.stream import Edit
from tasks.evaluation.evaluate import EvalResult, evaluate_loaded


@torch.no_grad()
def _logits(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True).to(loaded.device)
    return last_logits(loaded.model, batch["input_ids"], batch["attention_mask"]).cpu()


def logits_loaded(worker: Worker, texts: list[str], edit: Edit | None = None) -> torch.Tensor:
    """Next-token logits of the worker's model at the end of each text, (texts, vocab) float32; with
    ``edit``, through its hooks (the worker's model itself unedited)."""
    if edit is None:
        return _logits(worker.loaded, texts)
    with intervene(worker.loaded.model, ablation=edit.ablation(worker.loaded.device)):
        return _logits(worker.loaded, texts)


def evaluate_hooked(worker: Worker, edit: Edit, *args) -> EvalResult:
    """``evaluate_loaded(worker, *args)`` of the model as ``edit`` would leave it, applied by hooks."""
    with intervene(worker.loaded.model, ablation=edit.ablation(worker.loaded.device)):
        return evaluate_loaded(worker, *args)


def checkpoint_logits(path: str, opts: ModelOptions, texts: list[str]) -> torch.Tensor:
    """Load the checkpoint at ``path`` and return its next-token logits on ``texts``, (texts, vocab)."""
    loaded = load_model(path, opts)
    return _logits(loaded, texts)
