"""Abliterate: find a concept direction in the residual stream and remove it from the weights.

Local, on embedded defaults (packaged SmolLM2-135M-Instruct, bundled refusal prompts, local Ray,
MLflow store ./mlflow.db):

    python -m flows.abliterate
    python -m flows.abliterate data=french

On a Ray cluster (see cluster/README.md):

    ray job submit --working-dir . -- python -m flows.abliterate model=<hub id or path> data=refusal \
        ray.address=auto collect.workers=16 collect.gpus_per_worker=1 \
        output.uri=s3://bucket/models/x mlflow.tracking_uri=http://mlflow:5000

Steps (numbered as in README and in ``abliterate``): 1 inspect the model and load the prompts (then a
check that the unedited model shows the behaviour), 2 collect activations (Ray), 3 form candidates,
4 score them (Ray), 5 select one and refine it, 6 evaluate before, 7-8 evaluate the edit, applied by
hooks equal to the orthogonalized weights (6-8 on two Ray workers at once), 9 save the orthogonalized
checkpoint (streamed shard by shard, checked against the hooked model), 10 summary. Every step is
tracked in one MLflow run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hydra
import mlflow
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from safetensors.torch import save as save_tensors

from flows import _tracking as tracking
from flows._common import run_entry
from flows._save import save_edited
from flows._steps import (
    collect_sums,
    concept_eval_spec,
    evaluate_edit,
    load_concept,
    log_eval,
    require_behaviour,
    score_candidates_on_pool,
    summary_lines,
)
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.errors import CompalignError, keyed
from tasks.core.model import dtype_name, inspect_model
from tasks.core.plots import score_heatmaps
from tasks.core.progress import Progress
from tasks.directions.candidates import difference_of_means, load_direction, load_layer_weights
from tasks.directions.config import AbliterateConfig, SelectConfig
from tasks.directions.found import Found
from tasks.directions.refine import prepare_refine, refine_steps
from tasks.directions.select import choose, rank_candidates
from tasks.directions.stream import Edit
from tasks.evaluation.evaluate import EvalResult
from tasks.runtime.pool import WorkerPool

log = logging.getLogger("compalign.abliterate")


ConfigStore.instance().store(name="abliterate_schema", node=AbliterateConfig)


@dataclass
class AbliterateResult:
    """What an abliterate run found and measured."""

    run_id: str
    found: Found
    before: EvalResult
    """The unedited model on ``eval.split``."""
    after: EvalResult
    """The orthogonalized model on ``eval.split`` (KL against the unedited model)."""
    checkpoint: str | None
    """Where the edited checkpoint was saved (None: ``output.save=false``)."""


def abliterate(cfg: AbliterateConfig, raw: DictConfig) -> AbliterateResult:
    storage.configure(cfg.storage)
    log.info("abliterate: concept %r on %s", cfg.data.name, cfg.model)

    # 1. Inspect the model (config and tokenizer, no weights), load the prompt sets and any given
    #    direction, and check that every output location is writable: every input is checked before a
    #    worker starts or a run is recorded.
    spec = inspect_model(cfg.model, cfg.model_options)
    concept = load_concept(cfg.data, spec.tokenizer, cfg.collect, cfg.eval)
    given = given_direction(cfg, spec)
    tracking.check_outputs(cfg)

    with tracking.run(cfg.mlflow, f"abliterate-{cfg.data.name}", tags={"flow": "abliterate"}) as active:
        tracking.log_run_inputs(raw, concept.fingerprints, spec.identity, concept=cfg.data.name)
        pool = WorkerPool(cfg.model, cfg.model_options, cfg.collect, cfg.ray)
        try:
            # 2-5. Collect, form candidates, score and select one (or take the given one); refine it.
            found = given or find_direction(cfg, pool, spec, concept)
            found = refine(cfg, pool, concept, found)
            tracking.log_direction(found.tensors(), found.metadata(), found.layer, found.position)
            # 6-8. Evaluate the unedited model and, on a second worker at once, the edit (by hooks).
            before, after, editor = evaluate_edit(pool, concept, cfg.data.judge, cfg.eval, edit_of(found))
            log_eval(
                before, after, concept_eval_spec(concept, cfg.data, cfg.eval, dtype_name(cfg.model_options))
            )
            # 9. Save the orthogonalized checkpoint (streamed, checked, then moved into place); track it.
            location = save(cfg, pool, editor, spec.path, found, active.info.run_id)
        finally:
            pool.shutdown()

        # 10. Summary.
        result = AbliterateResult(active.info.run_id, found, before, after, location)
        for line in summary_lines(cfg.data.name, cfg.model, result, cfg.eval.split):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow, active.info))
        return result


def given_direction(cfg: AbliterateConfig, spec) -> Found | None:
    """The direction of ``direction.file`` (a path or an MLflow run's artifact), checked against the model."""
    if not cfg.direction.file:
        return None
    path = tracking.direction_source(cfg.direction.file, cfg.mlflow, "direction.file")
    with keyed("direction.file", cfg.direction.file):
        direction, metadata = load_direction(path, spec.hidden_size)
        return Found.from_file(direction, metadata, load_layer_weights(path, spec.n_layers))


def save(
    cfg: AbliterateConfig, pool: WorkerPool, editor: int, source: str, found: Found, run_id: str
) -> str | None:
    """Save the edit of the model at ``source`` (worker ``editor`` holds it edited) with its card, direction
    and coverage report; track where it went."""
    if not cfg.output.save:
        return None
    uri = storage.absolute(cfg.output.uri or f"checkpoints/{run_id}")
    extra = {"direction.safetensors": save_tensors(found.tensors(), found.metadata())}
    return save_edited(
        pool, editor, source, uri, _card(cfg, found, run_id), extra, edit_of(found), cfg.model_options,
        dtype_name(cfg.model_options), cfg.mlflow.checkpoint,
    )  # fmt: skip


def edit_of(found: Found) -> Edit:
    w = found.weights
    return Edit(found.direction) if w is None else Edit(found.direction, w.attn, w.mlp, w.embed)


def find_direction(cfg: AbliterateConfig, pool: WorkerPool, spec, concept) -> Found:
    # 1b. Does the unedited model show the behaviour at all? If not, stop here: nothing to remove.
    if cfg.select.min_behaviour > 0:
        flagged, total = require_behaviour(
            pool, cfg.model, concept, cfg.data.judge, cfg.select.min_behaviour, cfg.eval.batch_size
        )
        mlflow.log_metric("val.unedited_behaviour_rate", flagged / total)

    # 2. Collect residual activation sums on the train split (sharded on Ray; cached by content).
    dtype = dtype_name(cfg.model_options)
    target_sums, baseline_sums, collected = collect_sums(
        pool, spec, concept, cfg.collect, cfg.cache.uri, dtype
    )
    mlflow.set_tag("activation_cache", "miss" if collected else "hit")

    # 3. Candidate directions: difference of means per (layer, position).
    candidates = difference_of_means(target_sums, baseline_sums, projected=cfg.direction.projected)
    tracking.log_tensors(
        {"directions": candidates.directions, "norms": candidates.norms}, "candidates.safetensors"
    )

    # 4. Score candidates on the validation split: bypass, induce, KL (screen, then finalists).
    scoring = score_candidates_on_pool(pool, concept, candidates, spec.n_layers, cfg.score, cfg.select)
    clean_target, clean_baseline = scoring.clean
    mlflow.log_metrics(
        {"val.clean_target_log_odds": clean_target, "val.clean_baseline_log_odds": clean_baseline}
    )

    # 5. Select: drop candidates past the layer cut-off, over the KL limit or inducing too little; the
    #    lowest bypass wins. The whole ranked table and its heatmap are logged before choosing.
    table = rank_candidates(scoring.scores, spec.n_layers, cfg.select, clean_baseline, scoring.screened)
    tracking.log_table(table, "candidate_scores.csv")
    layer, position = choose_and_plot(table, cfg.select)
    chosen = table[(table.layer == layer) & (table.position == position)].iloc[0]
    mlflow.log_metrics({f"chosen.{k}": float(chosen[k]) for k in ("bypass", "induce", "induce_gain", "kl")})
    return Found(candidates.get(layer, position), layer, position, candidates.n_positions, table)


def refine(cfg: AbliterateConfig, pool: WorkerPool, concept, found: Found) -> Found:
    """5b. Refine the direction by gradient on the train prompts (tasks/directions/refine.py), under the same
    per-layer weights its removal will use; the unrefined direction is kept in MLflow beside it."""
    if not cfg.refine.steps or (found.source == "file" and not cfg.refine.given):
        return found
    tracking.log_tensors(found.tensors(), "unrefined.safetensors", found.metadata())
    args = (concept.target.train, concept.baseline.train, concept.token_ids, cfg.refine, cfg.score.kl_prompts)
    pool.call(0, prepare_refine, found.direction, *args, found.weights)
    done, chunk = 0, max(1, cfg.refine.steps // 20)
    with Progress("refine direction", cfg.refine.steps, "steps") as bar:
        while done < cfg.refine.steps:
            step = min(chunk, cfg.refine.steps - done)
            refined = pool.call(0, refine_steps, step)
            done += step
            bar.update(step)
    for index, row in enumerate(refined.history):
        mlflow.log_metrics({f"refine.{k}": v for k, v in row.items()}, step=index)
    first, last = refined.history[0], refined.history[-1]
    mlflow.log_metric("refine.cosine", refined.cosine)
    log.info(
        "refine: loss %.4f -> %.4f (behaviour %.4f -> %.4f, KL %.4f -> %.4f on the train mini-batches), "
        "cosine to the start %.3f",
        first["loss"],
        last["loss"],
        first["bypass"],
        last["bypass"],
        first["kl"],
        last["kl"],
        refined.cosine,
    )
    return dataclasses.replace(found, direction=refined.direction, refined_steps=cfg.refine.steps)


def choose_and_plot(table, select: SelectConfig) -> tuple[int, int]:
    """Log the heatmap (with the chosen candidate marked when there is one), then choose."""
    try:
        best = choose(table, select)
    except CompalignError:
        _log_heatmap(table, None)
        raise
    _log_heatmap(table, best)
    return best


def _log_heatmap(table, chosen: tuple[int, int] | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_file(score_heatmaps(table, Path(tmp) / "candidate_scores.png", chosen))


def _card(cfg: AbliterateConfig, found: Found, run_id: str) -> str:
    origin = (
        f"the difference-of-means direction of source layer {found.layer}, position {found.position}"
        if found.source == "search"
        else f"the direction from {cfg.direction.file}"
        + (" (with its per-layer kernel weights)" if found.weights is not None else "")
    ) + (f", refined by {found.refined_steps} gradient steps," if found.refined_steps else "")
    return model_card(
        cfg.model,
        {"concept": cfg.data.name, "layer": found.layer, "position": found.position, "mlflow_run": run_id},
        f"# {cfg.model} with the `{cfg.data.name}` direction removed\n\n"
        f"Weight-orthogonalized by compalign: {origin} was projected out of the token embeddings, every attention output projection "
        f"and every MLP down projection (MLflow run `{run_id}`, experiment `{cfg.mlflow.experiment}`). "
        "The direction is stored beside the weights as direction.safetensors.",
    )


@hydra.main(config_path="../conf", config_name="abliterate", version_base=None)
def main(raw: DictConfig) -> AbliterateResult:
    return run_entry(raw, AbliterateConfig, abliterate)


if __name__ == "__main__":
    main()
