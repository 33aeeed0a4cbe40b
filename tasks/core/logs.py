"""Keep third-party chatter (weight-loading bars, accelerator probes, deprecation notes) out of flow logs,
in the driver and in every Ray worker alike."""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = (
    "ray",
    "mlflow",
    "urllib3",
    "botocore",
    "s3fs",
    "aiobotocore",
    "alembic",
    "DeepSpeed",
    "filelock",
)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MLflow prints "🏃 View run ... at: <url>" to stdout at the end of every run against a server; the
    # flows log where the run is themselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        # Without it DeepSpeed (imported by transformers when installed) warns on every CPU-only start.
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
