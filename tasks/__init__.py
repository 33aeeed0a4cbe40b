"""compalign tasks: pure, typed functions that do the work of the flows (testable without Ray).

Rooms, each described in its own ``__init__``: ``core`` under everything; ``directions`` (the abliterate
pipeline), ``sweep`` (the sweep pipeline) and ``sft`` (the finetune pipeline) over it; ``evaluation``
(what every flow reports through); ``runtime`` (Ray, and only there). ``data/`` holds the bundled prompt
sets, texts, labelled answers and the fixture adapter. What may import what: README, Layout (checked
by tests/test_architecture.py).
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
"""The bundled data folder (tasks/data)."""
