"""The one place that knows about Ray: a pool of actors that each load the model once and run tasks.

Everything an actor does is a plain task function (collect, score) called on its own model, so the
same work runs without Ray in tests. The driver splits the work into shards, a few per worker, and
merges the results; progress advances as shards come back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tasks.core.checkpoint import save_checkpoint
from tasks.core.config import CollectConfig, EvalConfig, JudgeConfig, ModelOptions, RayConfig, RefineConfig
from tasks.core.errors import CompalignError
from tasks.core.progress import Progress
from tasks.directions.candidates import LayerWeights
from tasks.directions.collect import ActivationSums, collect_activation_sums
from tasks.directions.orthogonalize import orthogonalize_weights
from tasks.directions.refine import DirectionRefiner, Refined
from tasks.directions.score import Candidate, CandidateScore, CandidateScorer
from tasks.evaluation.evaluate import EvalResult, evaluate, generate
from tasks.evaluation.judges import make_judge, make_second_judge
from tasks.sweep.trials import Confirmation, Trial, TrialEvaluator, TrialScore, build_edit, confirm

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


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables this process has, less those the submitted job's runtime_env already
    sets: its workers get those anyway, and Ray refuses to start a driver that sets a job's variable again
    (`ray job submit --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": ...}}'`)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    from_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    for key in sorted(env.keys() & from_job.keys()):
        if env[key] != from_job[key]:
            log.warning(
                "%s=%s comes from the job's runtime_env; workers use it, not %s", key, from_job[key], env[key]
            )
        del env[key]
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(cfg: RayConfig) -> None:
    """Start a local Ray (default) or join ``cfg.address``; quiet unless something goes wrong.

    A local Ray gets its dashboard on a port chosen here, and RAY_API_SERVER_ADDRESS names it in the
    environment its processes inherit: Ray Train's placement-group cleaner polls the State API every
    second, and without a dashboard it logs a warning each time; with a second local Ray on the same
    machine, its auto-detected address could even be the other cluster's, where our training controller
    is unknown and so taken for dead (the cleaner then removes our workers' placement group)."""
    if ray.is_initialized():
        return
    env = forwarded_env()
    kwargs = {
        "address": cfg.address,
        "log_to_driver": cfg.log_to_driver,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if cfg.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only: the dashboard listens on loopback
        # Ray Train's spot-preemption watcher has nothing to watch on one machine, and its start logs an
        # error-level line (restartable actor with arguments in the object store) into every local run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs.update(
            num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
        )
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise CompalignError(f"cannot reach a Ray cluster at ray.address={cfg.address}: {exc}") from exc


@ray.remote
class ModelWorker:
    """Holds one loaded model; methods are thin calls into the task functions."""

    def __init__(self, model: str, options: ModelOptions, threads: int) -> None:
        from tasks.core.logs import quiet_libraries
        from tasks.core.model import load_model

        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.WARNING)
        self.loaded = load_model(model, options)
        self.scorer: CandidateScorer | None = None
        self.trials: TrialEvaluator | None = None
        self.refiner: DirectionRefiner | None = None
        self.candidates = None
        self.collected = 0

    def identity(self) -> str:
        return self.loaded.identity

    def collect(self, prompts: list[str], positions: int, batch_size: int) -> ActivationSums:
        self.collected += len(prompts)
        return collect_activation_sums(
            self.loaded.model, self.loaded.tokenizer, prompts, positions, batch_size
        )

    def prepare_scoring(
        self,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        batch_size: int,
        per_pass: int,
        kl_prompts: str,
    ) -> None:
        self.scorer = CandidateScorer(
            self.loaded.model,
            self.loaded.tokenizer,
            target,
            baseline,
            token_ids,
            batch_size,
            per_pass,
            kl_prompts,
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
        over_refusal: list[str] | None = None,
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
            second=make_second_judge(judge_cfg, self.loaded.model.device),
            over_refusal=over_refusal,
            harness=eval_cfg.harness,
        )

    def judge_behaviour(
        self, judge_cfg: JudgeConfig, prompts: list[str], max_new_tokens: int, batch_size: int
    ) -> list[bool]:
        """Greedy answers to ``prompts``, judged: True where an answer shows the behaviour."""
        answers = generate(self.loaded.model, self.loaded.tokenizer, prompts, max_new_tokens, batch_size)
        return make_judge(judge_cfg).judge(prompts, answers)

    def prepare_refine(
        self,
        direction: torch.Tensor,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        cfg: RefineConfig,
        kl_prompts: str,
        weights: LayerWeights | None = None,
    ) -> None:
        self.refiner = DirectionRefiner(
            self.loaded.model,
            self.loaded.tokenizer,
            direction.to(self.loaded.device),
            target,
            baseline,
            token_ids,
            cfg,
            weights,
            kl_prompts,
        )

    def refine_steps(self, steps: int) -> Refined:
        """Run ``steps`` more refinement steps; the state so far (the driver reports progress between calls)."""
        self.refiner.run(steps)
        return self.refiner.result()

    def orthogonalize(self, direction: torch.Tensor, weights: LayerWeights | None = None) -> int:
        r = direction.to(self.loaded.device)
        if weights is None:
            return len(orthogonalize_weights(self.loaded.model, r))
        edited = orthogonalize_weights(self.loaded.model, r, weights.attn, weights.mlp, weights.embed)
        return len(edited)

    def save(self, uri: str, card: str, extra_files: dict[str, bytes]) -> str:
        return save_checkpoint(self.loaded.model, self.loaded.tokenizer, uri, card, extra_files)

    # Sweep trials (tasks/sweep/trials.py): the model stays loaded, each trial's edit is applied through hooks.

    def collected_prompts(self) -> int:
        """Prompts this worker ran through ``collect`` (0 when every sum came from the cache)."""
        return self.collected

    def prepare_trials(
        self,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        batch_size: int,
        candidates,
        resume: bool,
        threshold: float | None,
        rate: str,
        kl_prompts: str,
        part: int,
        parts: int,
    ) -> list:
        """Tokenize the validation prompts and compute this worker's part of the unedited references
        (moved to CPU for the others to fetch)."""
        self.candidates = candidates
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        self.trials = TrialEvaluator(
            model,
            tokenizer,
            target,
            baseline,
            token_ids,
            batch_size,
            resume,
            threshold,
            False,
            rate,
            kl_prompts,
        )
        return [
            (i, {k: v.cpu() for k, v in resid.items()}, logits.cpu())
            for i, resid, logits in self.trials.reference_part(part, parts)
        ]

    def install_trial_references(self, *parts: list) -> TrialScore:
        self.trials.install_references([item for part in parts for item in part])
        return self.trials.clean

    def trial_threshold(self) -> float:
        return self.trials.threshold

    def run_trial(self, trial: Trial) -> TrialScore:
        return self.trials.evaluate(build_edit(trial, self.candidates), trial.number)

    def bare_forward_seconds(self, batch_size: int) -> float:
        return self.trials.bare_forward_seconds(batch_size)

    def confirm_trial(
        self,
        trial: Trial | None,
        judge_cfg: JudgeConfig,
        target: list[str],
        baseline: list[str],
        xstest: list[str],
        text: str,
        eval_cfg: EvalConfig,
        resamples: int,
        confidence: float,
        seed: int,
    ) -> Confirmation:
        edit = None if trial is None else build_edit(trial, self.candidates)
        return confirm(
            self.loaded.model, self.loaded.tokenizer, make_judge(judge_cfg), edit, target, baseline, xstest,
            text, eval_cfg, resamples, confidence, seed, None if trial is None else trial.number,
            make_second_judge(judge_cfg, self.loaded.model.device),
        )  # fmt: skip

    def export_trial(self, trial: Trial) -> int:
        """Bake an ablation trial into the weights (in place: this worker runs no more trials)."""
        ablation = build_edit(trial, self.candidates).ablation
        if ablation is None:
            return 0
        edited = orthogonalize_weights(
            self.loaded.model,
            ablation.direction.to(self.loaded.device),
            ablation.attn_weights,
            ablation.mlp_weights,
            ablation.embed_weight,
        )
        return len(edited)

    def score_answers(
        self,
        conversations: list[list[dict[str, str]]],
        direction: torch.Tensor,
        layer: int,
        tokens: int | None,
        batch_size: int,
        max_length: int,
    ) -> list[float]:
        """The SFT direction filter's per-conversation scores (tasks.sft.filter.answer_scores)."""
        from tasks.sft.filter import answer_scores

        return answer_scores(
            self.loaded.model,
            self.loaded.tokenizer,
            conversations,
            direction,
            layer,
            tokens,
            batch_size,
            max_length,
        )


def _wait_for_placement(pg, what: str, report_every_s: float = 60.0) -> None:
    """Wait until the placement group is placed, saying so now and then: on an autoscaling cluster a GPU
    node can take minutes to start, and on a cluster that has no node big enough it never comes."""
    waited, ready = 0.0, pg.ready()
    while not ray.wait([ready], timeout=report_every_s)[0]:
        waited += report_every_s
        log.warning(
            "still waiting for resources after %.0f s: %s (is there a node type with that much, and is the "
            "autoscaler allowed to start one?)",
            waited,
            what,
        )


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
        started = time.monotonic()
        log.info(
            "starting %d workers for %s (%g CPU, %g GPU each%s)",
            self.size,
            model,
            collect.cpus_per_worker,
            collect.gpus_per_worker,
            ", packed on one node" if ray_cfg.pack_on_one_node else "",
        )
        if ray_cfg.pack_on_one_node:
            bundle = {
                "CPU": collect.cpus_per_worker,
                **({"GPU": collect.gpus_per_worker} if collect.gpus_per_worker else {}),
            }
            self._pg = placement_group([bundle] * self.size, strategy="STRICT_PACK")
            _wait_for_placement(self._pg, f"{self.size} x {bundle} on one node")
            strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg)
        actor = ModelWorker.options(
            num_cpus=collect.cpus_per_worker, num_gpus=collect.gpus_per_worker, scheduling_strategy=strategy
        )
        threads = int(collect.cpus_per_worker)
        self.actors = [actor.remote(model, options, threads) for _ in range(self.size)]
        identities = set(ray.get([a.identity.remote() for a in self.actors]))
        if len(identities) != 1:
            raise CompalignError(f"workers loaded different weights for {model!r}: {sorted(identities)}")
        log.info("%d workers ready in %.0f s", self.size, time.monotonic() - started)

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
        self,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        batch_size: int,
        per_pass: int,
        kl_prompts: str = "without_behaviour",
    ) -> tuple[float, float]:
        """Tokenize the validation prompts and compute clean references on every worker; returns the clean
        (target, baseline) behaviour log-odds."""
        args = (target, baseline, token_ids, batch_size, per_pass, kl_prompts)
        ray.get([a.prepare_scoring.remote(*args) for a in self.actors])
        return ray.get(self.actors[0].clean_log_odds.remote())

    def score(self, candidates: list[Candidate], stage: str = "score candidates") -> list[CandidateScore]:
        """Scores in candidate order. Shards are contiguous runs (candidates come layer by layer, and the
        induce pass batches candidates of one layer)."""
        shards = _split(candidates, self.size * 4)
        calls = [(i % self.size, "score", (shard,)) for i, shard in enumerate(shards)]
        parts = self._run(stage, calls, [len(s) for s in shards], "candidates")
        return [score for part in parts for score in part]

    def collected_prompts(self) -> int:
        """Prompts the workers ran through ``collect`` since they started."""
        return sum(ray.get([a.collected_prompts.remote() for a in self.actors]))

    def prepare_trials(
        self,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        batch_size: int,
        candidates,
        resume: bool = True,
        threshold: float | None = None,
        rate: str = "top1",
        kl_prompts: str = "without_behaviour",
    ) -> TrialScore:
        """Tokenize the validation prompts on every worker, compute the unedited model's references
        (residuals entering every layer, logits) split over the workers, and give every worker all of
        them. Returns the unedited scores."""
        shared = ray.put(candidates)
        args = (target, baseline, token_ids, batch_size, shared, resume, threshold, rate, kl_prompts)
        parts = [a.prepare_trials.remote(*args, i, self.size) for i, a in enumerate(self.actors)]
        cleans = ray.get([a.install_trial_references.remote(*parts) for a in self.actors])
        return cleans[0]

    def score_answers(
        self,
        conversations: list[list[dict[str, str]]],
        direction: torch.Tensor,
        layer: int,
        tokens: int | None,
        batch_size: int,
        max_length: int,
    ) -> list[float]:
        """Direction-filter scores of every conversation, in order (sharded over the workers)."""
        shards = _split(conversations, self.size * 4)
        args = (direction, layer, tokens, batch_size, max_length)
        calls = [(i % self.size, "score_answers", (shard, *args)) for i, shard in enumerate(shards)]
        parts = self._run("direction filter", calls, [len(s) for s in shards], "rows")
        return [score for part in parts for score in part]

    def judge_behaviour(
        self, judge_cfg: JudgeConfig, prompts: list[str], max_new_tokens: int, batch_size: int, stage: str
    ) -> list[bool]:
        """Generate and judge answers to ``prompts``, sharded over the workers; flags in prompt order."""
        shards = [s for s in _split(prompts, self.size) if s]
        calls = [
            (i, "judge_behaviour", (judge_cfg, shard, max_new_tokens, batch_size))
            for i, shard in enumerate(shards)
        ]
        parts = self._run(stage, calls, [len(s) for s in shards], "prompts")
        return [flag for part in parts for flag in part]

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


class RayTrialRunner:
    """Runs sweep trials on a pool's workers (``tasks.sweep.search.TrialRunner``): each trial goes to the worker
    with the fewest trials in flight; a worker runs its trials one after another."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.load = [0] * pool.size
        self.busy: dict = {}

    def start(self, trial: Trial):
        worker = self.load.index(min(self.load))
        handle = self.pool.actors[worker].run_trial.remote(trial)
        self.load[worker] += 1
        self.busy[handle] = worker
        return handle

    def wait(self, handles: list) -> list:
        done, _ = ray.wait(handles, num_returns=1)
        return done

    def result(self, handle) -> TrialScore:
        self.load[self.busy.pop(handle)] -= 1
        return ray.get(handle)
