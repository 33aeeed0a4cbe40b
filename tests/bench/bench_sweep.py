"""Benchmark of sweep trials on Ray with the packaged SmolLM2 at Heretic's evaluation sizes (run by hand,
not by CI):

    python tests/bench/bench_sweep.py [--trials 24] [--train 128]

Validation prompts as Heretic's per-trial evaluation: the 39 harmful_val prompts (behaviour rate and
log-odds at the first token; Heretic generates 100 tokens for each) and the first 100 harmless_val
prompts (first-token KL, as Heretic). Directions from harmful_train / harmless_train.

1. Cold start with 2 workers (1 CPU each): Ray, model load, collection (a fresh activation cache),
   candidates, validation references, then a seeded TPE search over the Heretic-like space of
   conf/search/tpe.yaml. Prints the time to the first trial result and to the final Pareto front.
2. The same trials again on 1 worker (activation cache warm).
Prints trials per hour with 1 and 2 workers, the scaling ratio, the cost of one trial in units of a
bare forward pass over the validation set (whole prompts, no prefix reuse, measured on the same
worker), and our trials per hour beside Heretic 1.4's 63 on this machine (16 min before its first trial).
The steps are those of flows/sweep.py without MLflow logging and without the confirmation.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the heavy imports: start-up includes them

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

HERETIC_TRIALS_PER_HOUR = 63
HERETIC_FIRST_TRIAL_S = 16 * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--train", type=int, default=128, help="train prompts per set for the directions")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from flows._steps import ConceptData, collect_sums
    from flows.sweep import prepare_references
    from tasks.core.concept_config import CollectConfig, PromptSource
    from tasks.core.config import ModelOptions, RayConfig
    from tasks.core.contrast import behaviour_token_ids
    from tasks.core.logs import quiet_libraries
    from tasks.core.model import inspect_model
    from tasks.core.prompts import PromptSplit, load_prompts, resolve_positions
    from tasks.directions.candidates import difference_of_means
    from tasks.runtime.cluster import init_ray
    from tasks.runtime.pool import WorkerPool
    from tasks.sweep.config import SearchConfig, SweepSpace
    from tasks.sweep.front import pareto_mask
    from tasks.sweep.search import GridProposer, PoolTrialRunner, TpeProposer, dimensions, run_search
    from tasks.sweep.trials import bare_forward_seconds

    quiet_libraries()

    def shared(name: str, n: int | None = None) -> list[str]:
        return load_prompts(PromptSource(source=str(SHARED / name), column="instruction", limit=n))

    target_val, baseline_val = shared("harmful_val.jsonl"), shared("harmless_val.jsonl", 100)
    spec = inspect_model("packaged:smollm2", ModelOptions())
    concept = ConceptData(
        target=PromptSplit(shared("harmful_train.jsonl", args.train), target_val, []),
        baseline=PromptSplit(shared("harmless_train.jsonl", args.train), baseline_val, []),
        fingerprints={},
        positions=resolve_positions(spec.tokenizer, None),
        token_ids=behaviour_token_ids(spec.tokenizer, ["I", "Sorry", "As", "Unfortunately", "My"]),
        perplexity_text="",
        over_refusal=[],
    )
    tpe = OmegaConf.load(REPO / "conf" / "search" / "tpe.yaml")
    space = SweepSpace(**OmegaConf.to_container(tpe.sweep))
    dims = dimensions(space, spec.n_layers, concept.positions)
    cache = tempfile.mkdtemp(prefix="bench-sweep-cache-")
    init_ray(RayConfig(num_cpus=2, log_to_driver=False))  # as the flows start it
    load = os.getloadavg()

    def run(workers: int, proposer, started: float) -> dict:
        collect = CollectConfig(workers=workers, cpus_per_worker=1, batch_size=16)
        pool = WorkerPool("packaged:smollm2", ModelOptions(), collect, RayConfig())
        try:
            marks = {"workers ready": time.monotonic() - started}
            target, baseline, collected = collect_sums(pool, spec, concept, collect, cache, "float32")
            marks["collected" + ("" if collected else " (cache hit)")] = time.monotonic() - started
            candidates = difference_of_means(target, baseline)
            search = SearchConfig(batch_size=args.batch_size)
            clean, _ = prepare_references(pool, concept, search, candidates)
            marks["validation references"] = time.monotonic() - started
            first: list[float] = []
            search_start = time.monotonic()

            def on_result(_record) -> None:
                if not first:
                    first.append(time.monotonic() - started)

            records = run_search(proposer, PoolTrialRunner(pool), workers, on_result)
            search_s = time.monotonic() - search_start
            pareto_mask([(r.score.behaviour_rate, r.score.kl) for r in records])
            marks["first trial"] = first[0]
            marks["final front"] = time.monotonic() - started
            bare = pool.call(0, bare_forward_seconds, args.batch_size)
        finally:
            pool.shutdown()
        return {"records": records, "search_s": search_s, "marks": marks, "bare_s": bare, "clean": clean}

    two = run(2, TpeProposer(dims, args.trials, seed=0, startup_trials=10), STARTED)
    trials = [r.trial for r in two["records"]]
    one = run(1, GridProposer(trials), time.monotonic())

    def per_hour(result: dict) -> float:
        return 3600 * len(result["records"]) / result["search_s"]

    def cost(result: dict) -> float:
        return statistics.median(r.score.seconds for r in result["records"]) / result["bare_s"]

    starts = [start_layer(r.trial, spec.n_layers) for r in two["records"]]
    print(f"sweep benchmark: packaged SmolLM2-135M-Instruct, float32 CPU, {len(trials)} TPE trials, "
          f"{len(target_val)} target + {len(baseline_val)} baseline validation prompts, {args.train}+{args.train} "
          f"train prompts; load average at start {load[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(
        f"  unedited model     greedy first token is a refusal token on {two['clean'].behaviour_rate:.0%} of target prompts"
    )
    for name, result in (("2 workers (cold)", two), ("1 worker (warm)", one)):
        marks = ", ".join(f"{k} {v:.0f} s" for k, v in result["marks"].items())
        print(f"  {name:<18} {marks}")
    print(f"  trials per hour    1 worker {per_hour(one):.0f}, 2 workers {per_hour(two):.0f} "
          f"(scaling {per_hour(two) / per_hour(one):.2f}x); Heretic 1.4: {HERETIC_TRIALS_PER_HOUR} "
          f"-> {per_hour(two) / HERETIC_TRIALS_PER_HOUR:.1f}x with 2 workers, "
          f"{per_hour(one) / HERETIC_TRIALS_PER_HOUR:.1f}x with 1")  # fmt: skip
    for name, result, workers in (("1 worker", one, 1), ("2 workers", two, 2)):
        busy = sum(r.score.seconds for r in result["records"]) / (workers * result["search_s"])
        median = statistics.median(r.score.seconds for r in result["records"])
        print(f"  {name:<18} median trial {median:.2f} s on its worker, workers busy {busy:.0%} of the search "
              "(a trial slower with 2 workers than with 1 means they share cores with other processes)")  # fmt: skip
    print(f"  trial cost         median {statistics.median(r.score.seconds for r in one['records']):.2f} s on a worker = "
          f"{cost(one):.2f} bare forward passes over the validation set (bare pass {one['bare_s']:.2f} s, 1 thread); "
          f"mean start layer {statistics.mean(starts):.1f} of {spec.n_layers}")  # fmt: skip
    print(f"  load average       {os.getloadavg()[0]:.1f} at the end")
    print(f"  first trial        {two['marks']['first trial']:.0f} s after start (Heretic: {HERETIC_FIRST_TRIAL_S} s); "
          f"final front after {two['marks']['final front']:.0f} s")  # fmt: skip


def start_layer(trial, n_layers: int) -> int:
    """First decoder layer a trial's ablation kernels touch (where its forward pass starts)."""
    from tasks.sweep.kernels import first_active_layer, kernel_weights

    if trial.embed_weight:
        return 0
    first = first_active_layer(kernel_weights(trial.attn, n_layers), kernel_weights(trial.mlp, n_layers))
    return n_layers if first is None else first


if __name__ == "__main__":
    main()
