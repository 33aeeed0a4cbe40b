"""The one place that knows about Ray: a pool of actors that each load the model once and run tasks.

Everything an actor does is a plain task function (collect, score) called on its own model, so the
same work runs without Ray in tests. The driver splits the work into shards, a few per worker, and
merges the results; progress advances as shards come back.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tasks.checkpoint import save_checkpoint
from tasks.collect import ActivationSums, collect_activation_sums
from tasks.config import CollectConfig, EvalConfig, JudgeConfig, ModelOptions, RayConfig
from tasks.errors import CompalignError
from tasks.evaluate import EvalResult, evaluate
from tasks.judges import make_judge
from tasks.orthogonalize import orthogonalize_weights
from tasks.progress import Progress
from tasks.score import Candidate, CandidateScore, CandidateScorer

log = logging.getLogger(__name__)

# Environment that workers on a cluster need to see like the driver does (never credentials: those
# come from the nodes' own environment or instance profile).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "COMPALIGN_MODEL_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)


def init_ray(cfg: RayConfig) -> None:
    """Start a local Ray (default) or join ``cfg.address``; quiet unless something goes wrong."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = {
        "address": cfg.address,
        "log_to_driver": cfg.log_to_driver,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if cfg.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only: the dashboard is not exposed
        kwargs.update(num_cpus=cfg.num_cpus, include_dashboard=False)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise CompalignError(f"cannot reach a Ray cluster at ray.address={cfg.address}: {exc}") from exc


@ray.remote
class ModelWorker:
    """Holds one loaded model; methods are thin calls into the task functions."""

    def __init__(self, model: str, options: ModelOptions, threads: int) -> None:
        from tasks.logs import quiet_libraries
        from tasks.model import load_model

        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.WARNING)
        self.loaded = load_model(model, options)
        self.scorer: CandidateScorer | None = None

    def identity(self) -> str:
        return self.loaded.identity

    def collect(self, prompts: list[str], positions: int, batch_size: int) -> ActivationSums:
        return collect_activation_sums(
            self.loaded.model, self.loaded.tokenizer, prompts, positions, batch_size
        )

    def prepare_scoring(
        self, target: list[str], baseline: list[str], token_ids: list[int], batch_size: int, per_pass: int
    ) -> None:
        self.scorer = CandidateScorer(
            self.loaded.model, self.loaded.tokenizer, target, baseline, token_ids, batch_size, per_pass
        )

    def clean_log_odds(self) -> tuple[float, float]:
        return self.scorer.clean_target_log_odds, self.scorer.clean_baseline_log_odds

    def score(self, candidates: list[Candidate]) -> list[CandidateScore]:
        return self.scorer.score(candidates)

    def evaluate(
        self,
        judge_cfg: JudgeConfig,
        target: list[str],
        baseline: list[str],
        text: str,
        eval_cfg: EvalConfig,
        reference=None,
    ) -> EvalResult:
        return evaluate(
            self.loaded.model,
            self.loaded.tokenizer,
            make_judge(judge_cfg),
            target,
            baseline,
            text,
            eval_cfg.max_new_tokens,
            eval_cfg.batch_size,
            eval_cfg.perplexity_tokens,
            reference,
        )

    def orthogonalize(self, direction: torch.Tensor) -> int:
        return len(orthogonalize_weights(self.loaded.model, direction.to(self.loaded.device)))

    def save(self, uri: str, card: str, extra_files: dict[str, bytes]) -> str:
        return save_checkpoint(self.loaded.model, self.loaded.tokenizer, uri, card, extra_files)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, nearly equal parts (none empty when len(items) >= parts)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class WorkerPool:
    """``workers`` model-holding actors with the resources of ``CollectConfig``."""

    def __init__(self, model: str, options: ModelOptions, collect: CollectConfig, ray_cfg: RayConfig) -> None:
        init_ray(ray_cfg)
        self.size = collect.workers
        self._pg = None
        strategy = None
        if ray_cfg.pack_on_one_node:
            bundle = {
                "CPU": collect.cpus_per_worker,
                **({"GPU": collect.gpus_per_worker} if collect.gpus_per_worker else {}),
            }
            self._pg = placement_group([bundle] * self.size, strategy="STRICT_PACK")
            ray.get(self._pg.ready())
            strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg)
        actor = ModelWorker.options(
            num_cpus=collect.cpus_per_worker, num_gpus=collect.gpus_per_worker, scheduling_strategy=strategy
        )
        threads = int(collect.cpus_per_worker)
        self.actors = [actor.remote(model, options, threads) for _ in range(self.size)]
        identities = set(ray.get([a.identity.remote() for a in self.actors]))
        if len(identities) != 1:
            raise CompalignError(f"workers loaded different weights for {model!r}: {sorted(identities)}")

    def _run(self, stage: str, calls: list[tuple[int, str, tuple]], weights: list[int], unit: str) -> list:
        """Submit (actor index, method, args) calls; results in submission order, progress as they finish."""
        futures = [getattr(self.actors[i], method).remote(*args) for i, method, args in calls]
        pending = {f: w for f, w in zip(futures, weights, strict=True)}
        with Progress(stage, sum(weights), unit) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for f in done:
                    bar.update(pending.pop(f))
        return ray.get(futures)

    def collect(self, prompts: list[str], positions: int, batch_size: int, stage: str) -> ActivationSums:
        """Sums over all prompts, sharded (a few shards per worker so progress moves); exact merge."""
        if len(prompts) < self.size:
            raise CompalignError(
                f"{stage}: {len(prompts)} prompts for {self.size} workers; give more prompts or set collect.workers <= {len(prompts)}"
            )
        shards = _split(prompts, self.size * 4)
        calls = [(i % self.size, "collect", (shard, positions, batch_size)) for i, shard in enumerate(shards)]
        parts = self._run(stage, calls, [len(s) for s in shards], "prompts")
        return ActivationSums.merge(parts)

    def prepare_scoring(
        self, target: list[str], baseline: list[str], token_ids: list[int], batch_size: int, per_pass: int
    ) -> tuple[float, float]:
        """Tokenize the validation prompts and compute clean references on every worker; returns the clean
        (target, baseline) behaviour log-odds."""
        ray.get(
            [a.prepare_scoring.remote(target, baseline, token_ids, batch_size, per_pass) for a in self.actors]
        )
        return ray.get(self.actors[0].clean_log_odds.remote())

    def score(self, candidates: list[Candidate], stage: str = "score candidates") -> list[CandidateScore]:
        """Scores in candidate order. Shards are contiguous runs (candidates come layer by layer, and the
        induce pass batches candidates of one layer)."""
        shards = _split(candidates, self.size * 4)
        calls = [(i % self.size, "score", (shard,)) for i, shard in enumerate(shards)]
        parts = self._run(stage, calls, [len(s) for s in shards], "candidates")
        return [score for part in parts for score in part]

    def submit(self, worker: int, method: str, *args):
        """Start ``method`` on one worker; returns a Ray future (``ray.get`` it)."""
        return getattr(self.actors[worker], method).remote(*args)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
