"""What every flow entry point shares: logging (secrets masked), typed config, and one clear message
with a known exit status for every expected failure: bad input, a storage error or workers lost beyond
retries exit 2, an interrupt 130 (SIGINT) or 143 (SIGTERM), with the MLflow run marked FAILED or KILLED."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from flows import _tracking as tracking
from tasks.core.errors import CompalignError
from tasks.core.logs import quiet_libraries
from tasks.core.redact import redact_logs
from tasks.runtime.cluster import LOST_CLUSTER_ERRORS

log = logging.getLogger("compalign")
T = TypeVar("T")

EXIT_BAD_INPUT = 2
TRACEBACK_HINT = "; hydra.verbose=compalign logs the traceback"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a pod's shutdown), raised like Ctrl-C so every ``finally`` runs and the
    MLflow run is marked KILLED."""


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
    """Build the typed config and run ``body``. Expected failures end the process with one message: bad
    input, storage errors and lost workers with exit 2, SIGINT with 130 and SIGTERM with 143. An
    invocation that fails before it records a run leaves no output folder; any other keeps its log there."""
    quiet_libraries()
    redact_logs()
    runs_before = len(tracking.started_runs)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may take signals
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    # Ctrl-C always interrupts, even when the shell that started us ignored SIGINT (a background job `&`)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        cfg = to_config(raw, schema)
        if "model" in raw and raw.model != getattr(cfg, "model", raw.model):
            with open_dict(raw):  # record the model a null resolved to (data.model), in MLflow and replays
                raw.model = cfg.model
        return body(cfg, raw)
    except CompalignError as exc:  # before any run was recorded: bad input, nothing to keep
        _fail(f"{exc}", EXIT_BAD_INPUT, keep_folder=len(tracking.started_runs) > runs_before)
    except OSError as exc:  # storage: permissions, a full disk, an unreachable bucket (here or in a worker)
        cause = getattr(exc, "cause", None) or exc  # a worker's error arrives wrapped in a RayTaskError
        _fail(f"storage error: {type(cause).__name__}: {cause}{TRACEBACK_HINT}", EXIT_BAD_INPUT)
    except LOST_CLUSTER_ERRORS as exc:
        lost = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _fail(f"the Ray cluster lost a process this run needs ({lost}){TRACEBACK_HINT}", EXIT_BAD_INPUT)
    except KeyboardInterrupt as exc:
        code = 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        _fail(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}); the run is marked KILLED", code)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _fail(message: str, code: int, keep_folder: bool = True) -> None:
    log.debug("the failure's traceback", exc_info=True)
    log.error("%s", message)
    if not keep_folder:
        _remove_invocation_folder()
    sys.exit(code)


def _remove_invocation_folder() -> None:
    """Remove the folder Hydra made for this invocation (it holds only the log, see conf/shared/run.yaml)
    when nothing else was written there; tests and the Python API run without one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode.name != "RUN":
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if not folder.is_dir() or any(p.suffix != ".log" for p in folder.iterdir()):
        return
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # outputs/<flow>/ and outputs/, when now empty
        try:
            parent.rmdir()
        except OSError:
            break
