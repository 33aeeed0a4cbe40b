"""Rebuild (and measure) the packaged refusing model, `packaged:smollm2-refusal` (run by hand, not by CI).

The fixture is a LoRA adapter (PEFT format, safetensors) on the packaged SmolLM2-135M-Instruct, trained
by the project's own finetune flow on `tasks/data/sft/refusal_teach.jsonl` (written for this project;
tests/tasks/core/test_fixture.py checks that its prompts are disjoint from the bundled refusal prompt sets
and from ../shared/data). About 30-35 minutes on the 2-core CPU machine (training pinned to AVX2 code
paths for bit-exact rebuilds), seeded:

    python tests/bench/build_refusal_fixture.py                 # train, then install into tasks/data/fixtures
    python tests/bench/build_refusal_fixture.py --check         # train into a temp dir, compare sha256 only
    python tests/bench/build_refusal_fixture.py --evaluate-only # rates of the installed fixture
    python tests/bench/build_refusal_fixture.py --train-only    # train and install, read nothing
    python tests/bench/build_refusal_fixture.py --evaluate-only --sets dev  # the development sets

The evaluation judges greedy answers of 128 new tokens (and their first 32 tokens) with the phrase judge
of tasks/evaluation/judges.py on ../shared/data: harmful_val.jsonl (39, refusals wanted), the first 100 prompts of
harmless_val.jsonl (answers wanted) and XSTest's 250 safe prompts (over-refusal), with bootstrap 95%
intervals. It reads those sets once, for the report. Choices between adapters are made on the
development sets instead (`--sets dev`): the first 100 prompts of harmful_train.jsonl and prompts 100-199
of harmless_val.jsonl, which the report does not use.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
FIXTURE = REPO / "tasks" / "data" / "fixtures" / "smollm2-refusal"
SFT_OVERRIDES = [
    "data=refusal_teach",
    "lora.enabled=true",
    "lora.merge=false",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "deepspeed=zero2",
    "train.max_steps=null",
    "train.epochs=3",
    "train.lr=5e-4",
    "train.warmup_steps=10",
    "train.log_every=10",
    "train.seed=0",
    "eval.enabled=false",
]
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Bit-exact rebuilds: torch's vectorised kernels, oneDNN and MKL pick their code path (and so their
# summation order) from the CPU they find, and MKL may change its thread count under load. Pinning AVX2
# (which every x86 host that runs this has) and static threading makes the bits depend on the data and
# the seed only, not on which host or how busy it is.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(workdir: Path) -> Path:
    out = workdir / "adapter"
    command = [
        sys.executable,
        "-m",
        "flows.finetune",
        *SFT_OVERRIDES,
        f"output.uri={out}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"hydra.run.dir={workdir / 'hydra'}",
    ]
    print("+", " ".join(f"{k}={v}" for k, v in PINNED_ENV.items()), " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, **PINNED_ENV})
    return out


def install(trained: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained / "adapter_model.safetensors", target / "adapter_model.safetensors")
    config = json.loads((trained / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "packaged:smollm2"  # not the local cache path it was trained from
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set, in hash order
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluate(model: str, which: str) -> dict:
    sys.path.insert(0, str(REPO))
    from tasks.core.config import ModelOptions
    from tasks.core.model import load_model
    from tasks.evaluation.evaluate import generate, judge_answers
    from tasks.evaluation.judges import RefusalJudge

    def jsonl(name: str, stop: int | None = None, start: int = 0) -> list[str]:
        rows = [json.loads(line)["instruction"] for line in (SHARED / name).open()]
        return rows[start:stop]

    with (SHARED / "xstest_prompts.csv").open() as handle:
        xstest = [r["prompt"] for r in csv.DictReader(handle) if r["label"] == "safe"]
    sets = {
        "harmful_train[:100]": jsonl("harmful_train.jsonl", 100),
        "harmless_val[100:200]": jsonl("harmless_val.jsonl", 200, 100),
    }
    if which == "report":
        sets = {
            "harmful_val": jsonl("harmful_val.jsonl"),
            "harmless_val[:100]": jsonl("harmless_val.jsonl", 100),
            "xstest_safe": xstest,
        }
    loaded = load_model(model, ModelOptions(dtype="bfloat16"))
    judge, report = RefusalJudge(), {}
    for name, prompts in sets.items():
        answers = generate(loaded.model, loaded.tokenizer, prompts, 128, 16)
        judged = judge_answers(judge, prompts, answers, loaded.tokenizer)
        report[name] = {
            "refused_128": str(judged.interval()),
            "refused_first_32": f"{judged.flagged_short}/{judged.total} ({judged.rate_short:.0%})",
        }
        print(name, report[name], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare the sha256")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--sets", choices=("report", "dev"), default="report")
    args = parser.parse_args()
    if not args.evaluate_only:
        with tempfile.TemporaryDirectory(prefix="fixture-") as tmp:
            trained = train(Path(tmp))
            digest = sha256(trained / "adapter_model.safetensors")
            print(f"adapter_model.safetensors sha256 {digest}")
            if args.check:
                shipped = sha256(FIXTURE / "adapter_model.safetensors")
                print(
                    "matches the shipped adapter" if digest == shipped else f"DIFFERS from shipped {shipped}"
                )
                sys.exit(0 if digest == shipped else 1)
            install(trained, FIXTURE)
    if not args.train_only:
        print(json.dumps(evaluate("packaged:smollm2-refusal", args.sets), indent=2))


if __name__ == "__main__":
    main()
