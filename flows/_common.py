"""What every flow entry point shares: logging, typed config, one clear error and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tasks.core.errors import CompalignError
from tasks.core.logs import quiet_libraries

log = logging.getLogger("compalign")
T = TypeVar("T")

EXIT_BAD_INPUT = 2


def to_config(raw: DictConfig, schema: type[T]) -> T:
    """The typed config (dataclass instances, every __post_init__ check run)."""
    try:
        cfg = OmegaConf.to_object(raw)
    except OmegaConfBaseException as exc:
        raise CompalignError(f"invalid configuration: {exc}") from exc
    if not isinstance(cfg, schema):
        raise CompalignError(f"configuration is a {type(cfg).__name__}, expected {schema.__name__}")
    return cfg


def run_entry(raw: DictConfig, schema: type[T], body: Callable[[T, DictConfig], object]) -> object:
    """Build the typed config and run ``body``; bad input ends the process with one message and exit 2."""
    quiet_libraries()
    try:
        cfg = to_config(raw, schema)
        if "model" in raw and raw.model != getattr(cfg, "model", raw.model):
            with open_dict(raw):  # record the model a null resolved to (data.model), in MLflow and replays
                raw.model = cfg.model
        return body(cfg, raw)
    except CompalignError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_BAD_INPUT)
