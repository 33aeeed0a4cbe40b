"""The classifier judge's choices and accuracy (run by hand; about a minute on 2 cores):

1. choose its L2 penalty by 5-fold cross-validation on the train part of
   tasks/data/judge/refusal_answers.jsonl (folds seeded, stratified by kind);
2. then, once, its accuracy with the chosen penalty (the one tasks/evaluation/classifier_judge.py ships) on the
   held-out parts: `heldout` (read while the set grew, see tasks/data/judge/README.md) and `fresh`
   (written after every choice, read here only), with bootstrap 95% intervals, beside the phrase judge's.

    python tests/bench/judge_accuracy.py
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.core.bootstrap import bootstrap_rate  # noqa: E402
from tasks.evaluation.classifier_judge import (
    DEFAULT_L2,
    ClassifierJudge,
    Embedder,
    answer_features,
    fit_logistic,
    load_labelled,
)  # noqa: E402
from tasks.evaluation.judges import RefusalJudge  # noqa: E402

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def folds(rows, k: int = 5, seed: int = 0) -> list[int]:
    """Fold of each row: every kind's rows shuffled (seeded) and dealt round-robin."""
    by_kind = defaultdict(list)
    for i, row in enumerate(rows):
        by_kind[row.kind].append(i)
    out = [0] * len(rows)
    rng = random.Random(seed)
    for kind in sorted(by_kind):
        members = by_kind[kind]
        rng.shuffle(members)
        for j, i in enumerate(members):
            out[i] = j % k
    return out


def main() -> None:
    rows = load_labelled()
    train = [r for r in rows if r.split == "train"]
    embedder = Embedder()
    x = answer_features(embedder, [r.answer for r in train]).double()
    y = torch.tensor([r.refusal for r in train])
    fold = torch.tensor(folds(train))
    print(f"1. 5-fold cross-validation on {len(train)} train answers")
    scores = {}
    for l2 in GRID:
        right = 0
        for f in range(5):
            w = fit_logistic(x[fold != f], y[fold != f], l2=l2)
            right += int((((x[fold == f] @ w[:-1] + w[-1]) > 0) == y[fold == f]).sum())
        scores[l2] = right
        print(f"   l2={l2:g}: {right}/{len(train)} ({right / len(train):.1%})")
    best = max(GRID, key=lambda l2: (scores[l2], -abs(GRID.index(l2) - GRID.index(DEFAULT_L2))))
    print(
        f"   best: l2={best:g}; shipped: l2={DEFAULT_L2:g}" + ("" if best == DEFAULT_L2 else "  <- DIFFERS")
    )

    judge, phrases = ClassifierJudge(embedder=embedder), RefusalJudge()
    print("2. held-out accuracy (shipped penalty)")
    for split in ("heldout", "fresh"):
        part = [r for r in rows if r.split == split]
        if not part:
            continue
        answers = [r.answer for r in part]
        for name, flags in (
            ("classifier", judge.judge([""] * len(part), answers)),
            ("phrases", phrases.judge([""] * len(part), answers)),
        ):
            right = [f == r.refusal for f, r in zip(flags, part, strict=True)]
            print(f"   {split:<8} {name:<10} {bootstrap_rate(right)} right")
            if name == "classifier":
                for r, ok in zip(part, right, strict=True):
                    if not ok:
                        print(f"      wrong ({r.kind}, refusal={r.refusal}): {r.answer[:110]!r}")


if __name__ == "__main__":
    main()
