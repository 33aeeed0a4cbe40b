"""Saving a Hugging Face checkpoint (safetensors, config, tokenizer with chat template, model card),
locally or to any fsspec URL, written in full before it appears under its name."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from tasks.core import publish

log = logging.getLogger(__name__)


def model_card(base_model: str, summary: dict, body: str) -> str:
    """A README.md with YAML front matter for the hub and a body saying what was done and by which run."""
    front = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: transformers",
        "tags:",
        "- compalign",
        "---",
    ]
    facts = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    return "\n".join(front) + f"\n\n{body}\n\n| key | value |\n|---|---|\n{facts}\n"


def publish_staged(uri: str, write: Callable[[Path], None]) -> str:
    """Run ``write(stage)`` into a staging directory, then move it into place at ``uri`` (local or
    fsspec); a failed write leaves nothing at ``uri`` and no staging directory. Returns the location."""
    stage = publish.staging_dir(uri)
    try:
        write(Path(stage))
        return publish.publish_dir(stage, uri, overwrite=True)
    finally:
        if Path(stage).exists():
            import shutil

            shutil.rmtree(stage, ignore_errors=True)


def save_checkpoint(
    model: nn.Module, tokenizer, uri: str, card: str, extra_files: dict[str, bytes] | None = None
) -> str:
    """Write the model (safetensors), its config, the tokenizer (chat template included) and ``card`` as
    README.md to ``uri``; staged and moved into place when complete. Returns the final location."""

    def write(stage: Path) -> None:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        (stage / "README.md").write_text(card, encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (stage / name).write_bytes(data)

    return publish_staged(uri, write)
