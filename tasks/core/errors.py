"""The one exception type a user sees: bad input or configuration, with a message that says what to change."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)
_NAMES_A_KEY = re.compile(r"[a-z_][a-z0-9_.]*(?:=|: | must )")  # "model=x: ...", "filter.layer must ..."


class CompalignError(Exception):
    """Raised for bad input (missing model, malformed prompt file, wrong direction width, ...).

    Flows catch it at the entry point, log the message once and exit with status 2;
    anything else is a bug and keeps its traceback.
    """


class ConfigError(CompalignError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``: a config check whose message names the key."""
    if not ok:
        raise ConfigError(message)


def choice(kind: type[E], value: object, key: str) -> E:
    """``value`` as a member of the string Enum ``kind``; one message naming ``key`` and the choices
    otherwise. Config fields keep ``str`` in the schema (Hydra composes any string) and hold the member
    after ``__post_init__``: a choice is checked here, once."""
    try:
        return kind(value)
    except ValueError:
        names = [str(m.value) for m in kind]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ConfigError(f"{key} must be {listed}, got {value!r}") from None


@contextmanager
def keyed(key: str, value: object) -> Iterator[None]:
    """Name the config key (and its value, unless the message shows it) in a CompalignError raised inside:
    ``direction.file=/x/d.safetensors: direction has shape (100,) ...``."""
    try:
        yield
    except CompalignError as exc:
        message = str(exc)
        if _NAMES_A_KEY.match(message):
            raise
        prefix = f"{key}: " if str(value) in message else f"{key}={value}: "
        raise type(exc)(prefix + message) from exc.__cause__
