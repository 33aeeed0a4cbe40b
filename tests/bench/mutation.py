"""Mutation testing of the core math and storage modules with mutmut (PyPI): the share of deliberate bugs
(mutants: an operator flipped, a constant changed, an argument dropped, ...) that the fast tests catch.
Run by hand, not in CI:

    pip install mutmut==3.8.1
    python tests/bench/mutation.py                       # every module below, ~20 min on 2 cores
    python tests/bench/mutation.py tasks/core/contrast.py  # one module

It copies the tracked files into a temporary folder (mutmut writes its mutants/ there, never here), runs
``mutmut run`` with each module's fast tests, and prints per module the mutants, how many the tests
killed (a timeout counts as killed: the bug made a test hang), survived, or reached no test, and the
share killed. Surviving mutants are listed so that a test can be written for each (``mutmut show <name>``
in the printed folder shows one)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each module and the tests that exercise it quickly (mutmut runs, for each mutant, only the tests of this
# selection that call the mutated function).
MODULES = {
    "tasks/core/contrast.py": ["tests/tasks/core/test_contrast.py", "tests/tasks/directions/test_score.py"],
    "tasks/directions/candidates.py": ["tests/tasks/directions/test_candidates.py"],
    "tasks/directions/orthogonalize.py": ["tests/tasks/directions/test_orthogonalize.py"],
    "tasks/sweep/front.py": ["tests/tasks/sweep/test_search.py"],
    # S3 paths against a moto server on loopback (started per mutant: the slowest part of the run)
    "tasks/core/storage.py": ["tests/tasks/core/test_storage.py", "tests/integrations/test_storage_s3.py"],
    "tasks/core/publish.py": ["tests/tasks/core/test_publish.py", "tests/integrations/test_storage_s3.py"],
    # The streamed save, the writers' placement rules, device placement and the SFT memory plan
    "tasks/directions/stream.py": ["tests/tasks/directions/test_stream.py"],
    "tasks/core/writers.py": [
        "tests/tasks/core/test_writers.py",
        "tests/tasks/core/test_model.py",
        "tests/tasks/directions/test_stream.py",
        "tests/tasks/directions/test_orthogonalize.py",
    ],
    "tasks/core/placement.py": ["tests/tasks/core/test_placement.py"],
    "tasks/sft/plan.py": ["tests/tasks/sft/test_plan.py", "tests/tasks/sft/test_plan_cli.py"],
}
# The slow ones (a real model, 90 concurrent publishes) are left to the full suite.
DESELECT = "not smollm2 and not concurrent and not gpu and not flow_refuses"  # + a flow in a subprocess
KILLED = ("killed", "timeout")


def config(modules: list[str]) -> str:
    tests = sorted({t for m in modules for t in MODULES.get(m, [])})
    quoted = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"  # noqa: E731
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["tasks"]\n'
        f"only_mutate = {quoted(modules)}\n"
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "{DESELECT}"]\n'
        'also_copy = ["flows", "conf", "cluster"]\n'
        "timeout_constant = 10.0\n"  # a fork's start varies by seconds on a busy machine: no false timeouts
    )


def results(work: Path) -> dict[str, str]:
    """mutant name -> status, from ``mutmut results --all true``."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pairs = (line.strip().rpartition(": ") for line in out.splitlines() if ": " in line)
    return {name: status for name, _, status in pairs}


def module_of(mutant: str, modules: list[str]) -> str:
    dotted = {m.removesuffix(".py").replace("/", "."): m for m in modules}
    return next(m for d, m in dotted.items() if mutant.startswith(d + "."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compalign-mutation-"))
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    with open(work / "pyproject.toml", "a", encoding="utf-8") as out:
        out.write(config(args.modules))
    print(f"mutmut run in {work} (its log: {work / 'mutmut.log'})", flush=True)
    with open(work / "mutmut.log", "wb") as log:
        # One intra-op thread: mutmut forks a child per mutant, and a child forked from a process whose
        # OpenMP pool has run hangs in it.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run"], cwd=work, env=env, stdout=log, stderr=log, check=True
        )

    status = results(work)
    table: dict[str, Counter] = {m: Counter() for m in args.modules}
    survivors = []
    for mutant, state in status.items():
        table[module_of(mutant, args.modules)][state] += 1
        if state not in KILLED:
            survivors.append(f"  {state:<9} {mutant}")
    print(f"\n{'module':<36} {'mutants':>7} {'killed':>7} {'survived':>8} {'no test':>7} {'killed %':>8}")
    total = Counter()
    for module, counts in table.items():
        total += counts
        print(_row(module, counts))
    print(_row("all", total))
    print("\nnot killed (mutmut show <name> in the folder above):\n" + "\n".join(survivors))


def _row(name: str, counts: Counter) -> str:
    n = sum(counts.values())
    killed = sum(counts[k] for k in KILLED)
    share = f"{100 * killed / n:.1f}" if n else "-"
    return f"{name:<36} {n:>7} {killed:>7} {counts['survived']:>8} {counts['no tests']:>7} {share:>8}"


if __name__ == "__main__":
    main()
