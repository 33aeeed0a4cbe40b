"""compalign tasks: pure, typed functions that do the work of the flows (testable without Ray).

Rooms: ``core`` (config, errors, logs, progress, storage, model loading, forward passes, hooks, prompts,
checkpoints, plots, bootstrap intervals) under everything; ``directions`` (collect activations, the
activation cache, candidate directions, scoring, selection, refinement, orthogonalization) and
``evaluation`` (generation, judges, evaluation specs, lm-evaluation-harness) for the abliterate flow;
``sweep`` (search spaces and samplers, trials, per-layer kernels) for the sweep flow; ``sft`` (config,
data, refusal filter, job spec, the Ray Train driver and training loop, checkpoint export) for the
finetune flow; ``runtime`` (the Ray model workers and their pool). ``data/`` holds the bundled prompt
sets, texts, labelled answers and the fixture adapter.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
"""The bundled data folder (tasks/data)."""
