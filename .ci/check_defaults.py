"""After the README's default commands, check in their MLflow store that each achieved something.

    python .ci/check_defaults.py abliterate|sweep|finetune [--store sqlite:///mlflow.db]

abliterate: the newest run finished and its target behaviour fell on the test split (after < before);
sweep: the newest run finished with a Pareto front of at least one trial;
finetune: the newest run finished and its training loss fell (last logged step below the first).
Exit 1 with one line saying what is missing.
"""

from __future__ import annotations

import argparse
import sys

from mlflow.tracking import MlflowClient


def newest(client: MlflowClient, flow: str):
    experiment = client.get_experiment_by_name("compalign")
    if experiment is None:
        sys.exit(f"{flow}: no 'compalign' experiment in the store")
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.flow = '{flow}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        sys.exit(f"{flow}: no run in the store")
    run = runs[0]
    if run.info.status != "FINISHED":
        sys.exit(f"{flow}: newest run {run.info.run_id} is {run.info.status}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("flow", choices=["abliterate", "sweep", "finetune"])
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.store)
    run = newest(client, args.flow)
    m = run.data.metrics
    if args.flow == "abliterate":
        before, after = m.get("before.target_rate"), m.get("after.target_rate")
        ok = before is not None and after is not None and after < before
        line = f"target behaviour {before} -> {after} on the test split, KL {m.get('after.kl')}"
    elif args.flow == "sweep":
        ok = m.get("search.front_size", 0) >= 1
        line = f"Pareto front of {m.get('search.front_size')} trials"
    else:
        history = client.get_metric_history(run.info.run_id, "train.loss")
        losses = [h.value for h in sorted(history, key=lambda h: h.step)]
        ok = len(losses) >= 2 and losses[-1] < losses[0]
        line = f"train.loss {losses[0] if losses else None} -> {losses[-1] if losses else None}"
    print(f"{args.flow} ({run.info.run_id}): {line}: {'ok' if ok else 'NOTHING ACHIEVED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
