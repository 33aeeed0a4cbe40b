"""Abliterate: find a concept direction in the residual stream and remove it from the weights.

Local, on embedded defaults (packaged SmolLM2-135M-Instruct, bundled refusal prompts, local Ray,
MLflow store ./mlflow.db):

    python -m flows.abliterate
    python -m flows.abliterate data=french

On a Ray cluster (see cluster/README.md):

    ray job submit --working-dir . -- python -m flows.abliterate model=<hub id or path> data=refusal \
        ray.address=auto collect.workers=16 collect.gpus_per_worker=1 \
        output.uri=s3://bucket/models/x mlflow.tracking_uri=http://mlflow:5000

Steps: load -> prompts -> collect (Ray) -> candidates -> score (Ray) -> select -> [refine] -> evaluate before ->
orthogonalize -> evaluate after -> save -> summary. Every step is tracked in one MLflow run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import mlflow
import pandas as pd
import ray
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from safetensors.torch import save

from flows import _tracking as tracking
from flows._common import run_entry
from flows._steps import (
    collect_sums,
    concept_eval_spec,
    evaluate_and_edit,
    load_concept,
    log_eval,
    require_behaviour,
    score_candidates_on_pool,
    summary_lines,
)
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.config import (
    CacheConfig,
    CollectConfig,
    ConceptConfig,
    DirectionConfig,
    MlflowConfig,
    ModelOptions,
    OutputConfig,
    RayConfig,
    RefineConfig,
    ScoreConfig,
    SelectConfig,
    SplitEvalConfig,
    StorageConfig,
    concept_model,
)
from tasks.core.errors import CompalignError
from tasks.core.model import dtype_name, inspect_model
from tasks.core.plots import score_heatmaps
from tasks.core.progress import Progress
from tasks.directions.candidates import LayerWeights, difference_of_means, load_direction, load_layer_weights
from tasks.directions.select import choose, rank_candidates
from tasks.runtime.workers import WorkerPool

log = logging.getLogger("compalign.abliterate")


@dataclass
class AbliterateConfig:
    model: str | None = None
    """packaged:smollm2[-refusal], a hub id, a directory with a safetensors checkpoint, or a .gguf file;
    null: the concept's own default (``data.model``), else packaged:smollm2."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    data: ConceptConfig = MISSING
    """The concept (config group conf/data: refusal, french)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    eval: SplitEvalConfig = field(default_factory=SplitEvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        self.model = concept_model(self.model, self.data)


ConfigStore.instance().store(name="abliterate_schema", node=AbliterateConfig)


def abliterate(cfg: AbliterateConfig, raw: DictConfig) -> dict:
    storage.configure(cfg.storage)
    log.info("abliterate: concept %r on %s", cfg.data.name, cfg.model)

    # 1. Inspect the model (config and tokenizer, no weights), load the prompt sets and any given
    #    direction: every input is checked before a worker starts or a run is recorded.
    spec = inspect_model(cfg.model, cfg.model_options)
    concept = load_concept(cfg.data, spec.tokenizer, cfg.collect, cfg.eval)
    given = None
    if cfg.direction.file:
        path = tracking.direction_source(cfg.direction.file, cfg.mlflow, "direction.file")
        direction, metadata = load_direction(path, spec.hidden_size)
        given = Found.from_file(direction, metadata, load_layer_weights(path, spec.n_layers))

    with tracking.run(cfg.mlflow, f"abliterate-{cfg.data.name}", tags={"flow": "abliterate"}) as active:
        tracking.log_config(raw)
        mlflow.log_params({f"fingerprint.{k}": v for k, v in concept.fingerprints.items()})
        mlflow.set_tags({"model_identity": spec.identity, "concept": cfg.data.name})
        pool = WorkerPool(cfg.model, cfg.model_options, cfg.collect, cfg.ray)
        try:
            # 2-5. Collect activations, form candidates, score them, select one (or take the given one).
            found = find_direction(cfg, pool, spec, concept) if given is None else given
            if cfg.refine.steps and (given is None or cfg.refine.given):
                found = refine(cfg, pool, concept, found)
            mlflow.log_params({"chosen.layer": found.layer, "chosen.position": found.position})
            tracking.log_tensors(found.tensors(), "chosen.safetensors", found.metadata())

            # 6-8. Evaluate the unedited model, orthogonalize a copy, evaluate that (on two workers at once).
            before, after, editor = evaluate_and_edit(
                pool, concept, cfg.data.judge, cfg.eval, found.direction, found.weights
            )
            dtype = dtype_name(cfg.model_options)
            log_eval(before, after, concept_eval_spec(concept, cfg.data, cfg.eval, dtype))

            # 9. Save the edited checkpoint (staged, then moved into place) and track it.
            location = None
            if cfg.output.save:
                uri = storage.absolute(cfg.output.uri or f"checkpoints/{active.info.run_id}")
                card = _card(cfg, found, active.info.run_id)
                extra = {"direction.safetensors": save(found.tensors(), found.metadata())}
                location = ray.get(pool.submit(editor, "save", uri, card, extra))
                tracking.log_checkpoint(cfg.mlflow.checkpoint, location)
        finally:
            pool.shutdown()

        # 10. Summary.
        result = {
            "run_id": active.info.run_id,
            "found": found,
            "before": before,
            "after": after,
            "checkpoint": location,
        }
        for line in summary_lines(cfg.data.name, cfg.model, result, cfg.eval.split):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow, active.info))
        return result


@dataclass
class Found:
    """The direction to remove and where it came from."""

    direction: torch.Tensor
    """(hidden,) unit vector."""
    layer: int | float | None
    """Source layer (fractional for a sweep's blended direction)."""
    position: int | None
    n_positions: int | None = None
    table: pd.DataFrame | None = None
    """The ranked candidate table (when searched)."""
    source: str = "search"
    weights: LayerWeights | None = None
    """Per-layer weights of the removal (a sweep's kernels); None removes it fully everywhere."""
    refined_steps: int = 0
    """Gradient steps the direction was refined by after it was found (0: as found)."""

    @staticmethod
    def from_file(
        direction: torch.Tensor, metadata: dict[str, str], weights: LayerWeights | None = None
    ) -> Found:
        def number(key: str) -> int | float | None:
            try:
                value = float(metadata.get(key, ""))
            except ValueError:
                return None
            return int(value) if value.is_integer() else value

        layer, position = number("layer"), number("position")
        return Found(
            direction, layer, None if position is None else int(position), source="file", weights=weights
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved beside the checkpoint and in MLflow: the direction (and the kernel weights)."""
        out = {"direction": self.direction.contiguous()}
        if self.weights is not None:
            out.update(attn_weights=self.weights.attn.contiguous(), mlp_weights=self.weights.mlp.contiguous())
        return out

    def metadata(self) -> dict[str, str]:
        meta = {"layer": str(self.layer), "position": str(self.position), "source": self.source}
        if self.refined_steps:
            meta["refined_steps"] = str(self.refined_steps)
        if self.weights is not None:
            meta["embed_weight"] = str(self.weights.embed)
        return meta


def find_direction(cfg: AbliterateConfig, pool: WorkerPool, spec, concept) -> Found:
    # 2a. Does the unedited model show the behaviour at all? If not, stop here: nothing to remove.
    if cfg.select.min_behaviour > 0:
        flagged, total = require_behaviour(
            pool, cfg.model, concept, cfg.data.judge, cfg.select.min_behaviour, cfg.eval.batch_size
        )
        mlflow.log_metric("val.unedited_behaviour_rate", flagged / total)

    # 2. Collect residual activation sums on the train split (sharded on Ray; cached by content).
    dtype = dtype_name(cfg.model_options)
    target_sums, baseline_sums, cached = collect_sums(pool, spec, concept, cfg.collect, cfg.cache.uri, dtype)
    mlflow.set_tag("activation_cache", "hit" if cached else "miss")

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
    tracking.log_tensors(found.tensors(), "unrefined.safetensors", found.metadata())
    args = (concept.target.train, concept.baseline.train, concept.token_ids, cfg.refine, cfg.score.kl_prompts)
    ray.get(pool.submit(0, "prepare_refine", found.direction, *args, found.weights))
    done, chunk = 0, max(1, cfg.refine.steps // 20)
    with Progress("refine direction", cfg.refine.steps, "steps") as bar:
        while done < cfg.refine.steps:
            step = min(chunk, cfg.refine.steps - done)
            refined = ray.get(pool.submit(0, "refine_steps", step))
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
def main(raw: DictConfig) -> dict:
    return run_entry(raw, AbliterateConfig, abliterate)


if __name__ == "__main__":
    main()
