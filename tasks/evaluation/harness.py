"""Capability benchmarks through EleutherAI's lm-evaluation-harness (the optional `lm_eval` extra).

Named harness tasks (hellaswag, arc_easy, mmlu, ...) run on the model a worker holds, edited or not, so a
flow reports them before and after its edit. Those tasks download their datasets, which a cluster can
and this project's test machine cannot; the bundled task ``compalign_everyday`` (60 three-way
multiple-choice items written for the project, tasks/data/capability/) runs anywhere and is how the
integration is tested. Install with ``pip install 'compalign[lmeval]'``.
"""

from __future__ import annotations

import logging
import math

from torch import nn

from tasks import DATA
from tasks.core.concept_config import HarnessConfig
from tasks.core.errors import CompalignError

log = logging.getLogger("compalign.harness")

CAPABILITY = DATA / "capability"
# Tasks shipped with the project: name -> jsonl of {"question", "choices", "answer"} rows.
BUNDLED_TASKS = {"compalign_everyday": CAPABILITY / "everyday_mc.jsonl"}


def bundled_task(name: str) -> dict:
    """The harness config of a bundled multiple-choice task: the loglikelihood of each choice after the
    question, accuracy plain and normalised by length. Read through `datasets`' local json builder."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(BUNDLED_TASKS[name])}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def run_harness(model: nn.Module, tokenizer, cfg: HarnessConfig) -> dict[str, float]:
    """Run ``cfg.tasks`` on ``model`` (hooks or edits on it apply). Returns flat metrics,
    ``<task>.<metric>`` -> value (acc, acc_norm, their stderr when the harness computed one)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise CompalignError(
            "eval.harness.tasks needs EleutherAI's lm-evaluation-harness: pip install 'compalign[lmeval]' "
            "(or set eval.harness.tasks=[])"
        ) from exc
    tasks = [bundled_task(t) if t in BUNDLED_TASKS else t for t in cfg.tasks]
    manager = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in BUNDLED_TASKS and t not in manager.all_tasks]
    if unknown:
        raise CompalignError(
            f"eval.harness.tasks: unknown task(s) {', '.join(unknown)}; bundled: {', '.join(BUNDLED_TASKS)}, "
            "or any lm-evaluation-harness task name (lm_eval --tasks list), or a folder of task YAMLs in "
            "eval.harness.include_path"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=cfg.bootstrap_iters,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        verbosity="ERROR",
    )
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if metric != "sample_len" and numeric and math.isfinite(value):
                metrics[f"{task}.{metric}"] = float(value)
    return metrics
