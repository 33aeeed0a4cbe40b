"""What one model-holding worker process has: the loaded model and the state its tasks keep between calls.

The Ray actor (tasks/runtime/pool.py) holds one ``Worker`` and runs plain functions on it,
``fn(worker, *args)``; the same functions run on a ``Worker`` built in-process in tests. A task that
prepares something once and uses it across calls (the tokenized validation prompts of a scorer, the
unedited references of a sweep) keeps it in ``state`` under its own key: the one place per-worker state
lives, and such a function is marked ``@sets_up`` so that a restarted worker can be brought back to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tasks.core.errors import CompalignError
from tasks.core.model import LoadedModel

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def sets_up(fn: F) -> F:
    """Mark a worker function that changes its worker (what it keeps in ``state``, or its model's
    weights) for the calls after it. A pool replays such calls, in order, on a worker that Ray restarted
    after it died, so the new process is in the state the lost one was in; calls without the mark are
    pure and simply run again."""
    fn.sets_up = True  # type: ignore[attr-defined]
    return fn


def is_setup(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, "sets_up", False))


@dataclass
class Worker:
    loaded: LoadedModel
    state: dict[str, Any] = field(default_factory=dict)

    def keep(self, key: str, value: T) -> T:
        self.state[key] = value
        return value

    def held(self, key: str, kind: type[T]) -> T:
        """The object a preparing call kept under ``key`` (a bug in the caller when it is missing)."""
        value = self.state.get(key)
        if not isinstance(value, kind):
            raise CompalignError(f"worker has no {kind.__name__} under {key!r}: prepare it first")
        return value

    def count(self, key: str, n: int) -> int:
        """Add ``n`` to the counter ``key``; its new value."""
        self.state[key] = self.state.get(key, 0) + n
        return self.state[key]
