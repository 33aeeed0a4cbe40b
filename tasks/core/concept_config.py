"""Typed configuration of a concept run (abliterate, sweep): the concept's prompts and judge (``data``),
collection on the worker pool (``collect``), how directions are formed (``direction``) and the evaluation
(``eval``), composed onto the shared sections of ``tasks.core.config.RunConfig``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from omegaconf import MISSING

from tasks.core.config import PACKAGED_MODEL, Resources, RunConfig
from tasks.core.errors import choice, require


class JudgeKind(StrEnum):
    refusal = "refusal"
    language = "language"


class EvalSplit(StrEnum):
    test = "test"
    val = "val"


def concept_model(model: str | None, concept: ConceptConfig) -> str:
    """The model a flow runs on: the top-level ``model`` when set, else the concept's, else the packaged one."""
    return model or concept.model or PACKAGED_MODEL


def check_fraction(name: str, value: float, low_open: bool = True) -> None:
    require(
        not math.isnan(value) and (0 < value <= 1 if low_open else 0 <= value < 1),
        f"{name} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value}",
    )


@dataclass
class PromptSource:
    """Where one prompt set comes from."""

    source: str = MISSING
    """bundled:<name> (tasks/data/prompts/<name>.jsonl), a jsonl/csv/txt/parquet file (local path or
    fsspec URL such as s3://bucket/key.jsonl), or hf:<dataset name> read through `datasets`."""
    column: str = "prompt"
    """Column (jsonl/csv/parquet/hf) holding the prompt text; ignored for txt (one prompt per line)."""
    split: str = "train"
    """Dataset split, for hf: sources only."""
    limit: int | None = None
    """Keep only the first N prompts (before the train/val/test split)."""

    def __post_init__(self) -> None:
        require(
            bool(self.source),
            "a prompt source must not be empty (set data.target.source / data.baseline.source)",
        )
        require(self.limit is None or self.limit > 0, f"prompt source limit must be > 0, got {self.limit}")


@dataclass
class JudgeConfig:
    """How a generated answer is judged to show the concept's behaviour."""

    kind: str = "refusal"
    """refusal (substring list) or language (share of the target language's function words)."""
    phrases: list[str] = field(default_factory=list)
    """refusal: substrings (case-insensitive) that mark a refusal; empty means the built-in list."""
    language: str = "fr"
    """language: ISO code of the language that counts as the behaviour (fr or en)."""
    second: str = "auto"
    """A second judge of another kind, read beside the first with their agreement (Cohen's kappa):
    classifier (sentence embeddings and a trained classifier, tasks/evaluation/classifier_judge.py; refusal only),
    trigram (character-trigram profiles, tasks/evaluation/trigram_judge.py; language only), none, or auto
    (classifier for refusal, trigram for language), or hub:<model id or local directory>: a judge model
    (a sequence classifier, or a HarmBench/LlamaGuard-style causal LM) run on the evaluating worker's
    device (tasks/evaluation/hub_judge.py; the hub_* keys below)."""
    hub_flag: str = ""
    """hub judges: the classifier label (or, for a causal LM judge, the answer word) meaning the behaviour
    is shown. Empty: the label holding "refus" (refusal) or named by the language code (language)."""
    hub_other: str = ""
    """hub causal LM judges: the competing answer word (flagged when hub_flag's first token is likelier)."""
    hub_template: str = ""
    """hub causal LM judges: the judge's prompt, with {prompt} and {response}; empty: its chat template."""
    hub_revision: str | None = None
    """hub judges: the hub revision (branch, tag or commit) of the judge model."""
    hub_batch_size: int = 16
    hub_max_length: int = 1024
    """hub judges: tokens of the (prompt, response) input kept (longer inputs are cut)."""

    def __post_init__(self) -> None:
        self.kind = choice(JudgeKind, self.kind, "data.judge.kind")
        hub = self.second.startswith("hub:")
        require(
            self.second in ("auto", "classifier", "trigram", "none") or (hub and len(self.second) > 4),
            f"data.judge.second must be auto, classifier, trigram, none or hub:<model id or path>, got {self.second!r}",
        )
        require(self.hub_batch_size > 0, f"data.judge.hub_batch_size must be > 0, got {self.hub_batch_size}")
        require(self.hub_max_length > 0, f"data.judge.hub_max_length must be > 0, got {self.hub_max_length}")
        require(
            self.second != "classifier" or self.kind == "refusal",
            "data.judge.second=classifier judges refusals only; use data.judge.second=trigram with kind=language",
        )
        require(
            self.second != "trigram" or self.kind == "language",
            "data.judge.second=trigram judges languages only; use data.judge.second=classifier with kind=refusal",
        )
        require(
            self.kind != "language" or self.language in ("fr", "en"),
            f"data.judge.language must be fr or en, got {self.language!r}",
        )


@dataclass
class SplitConfig:
    """Seeded train/validation/test split of each prompt set."""

    val: float = 0.25
    """Fraction of each set used to score and select candidates."""
    test: float = 0.25
    """Fraction held out for the before/after evaluation (never used for selection)."""
    seed: int = 0
    """Seed of the shuffle. Sets of equal length get the same permutation, so paired sets stay paired."""

    def __post_init__(self) -> None:
        for name, value in (("val", self.val), ("test", self.test)):
            require(0 < value < 1, f"data.split.{name} must be in (0, 1), got {value}")
        require(
            self.val + self.test < 1,
            f"data.split.val + data.split.test must be < 1, got {self.val + self.test}",
        )


@dataclass
class ValidationSets:
    """Validation prompts from another source than the train prompts (both or neither). Selection then
    reads how an edit fitted on one source carries over to another; the train sets' own validation part
    joins their train part, and their test part stays the held-out report set."""

    target: str | None = None
    """Source of the target prompts to score and select on (formats as data.target.source)."""
    baseline: str | None = None
    """Source of the baseline prompts to score and select on."""
    target_column: str = "prompt"
    baseline_column: str = "prompt"
    limit: int | None = None
    """Keep only the first N prompts of each."""

    def __post_init__(self) -> None:
        require(
            (self.target is None) == (self.baseline is None),
            "data.validation.target and data.validation.baseline go together: set both sources or neither",
        )
        require(self.limit is None or self.limit > 0, f"data.validation.limit must be > 0, got {self.limit}")

    def sources(self) -> tuple[PromptSource, PromptSource] | None:
        """(target, baseline) prompt sources, or None when off."""
        if self.target is None or self.baseline is None:
            return None
        return (
            PromptSource(self.target, self.target_column, limit=self.limit),
            PromptSource(self.baseline, self.baseline_column, limit=self.limit),
        )


@dataclass
class ConceptConfig:
    """A concept: two contrastive prompt sets, how its behaviour is scored and how it is judged."""

    name: str = MISSING
    """Short name, used in run names and the model card (refusal, french, ...)."""
    target: PromptSource = field(default_factory=PromptSource)
    """Prompts that show the behaviour (harmful requests for refusal, French questions for french)."""
    baseline: PromptSource = field(default_factory=PromptSource)
    """Contrast prompts that do not (harmless requests, the same questions in English)."""
    score_tokens: list[str] = field(default_factory=list)
    """Strings whose first tokens mark the behaviour at the first generated position; the score is the
    log-odds of their summed probability."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    validation: ValidationSets = field(default_factory=ValidationSets)
    model: str | None = None
    """The model a flow uses for this concept when its top-level ``model`` is null (refusal: the packaged
    model taught to refuse, since the plain one barely refuses); null: packaged:smollm2."""

    def __post_init__(self) -> None:
        require(
            len(self.score_tokens) > 0,
            f"data.score_tokens must list at least one string for concept {self.name!r}",
        )


@dataclass
class CollectConfig(Resources):
    """Activation collection and the Ray worker pool that also scores candidates, evaluates and edits."""

    key = "collect"
    batch_size: int = 16
    """Prompts per forward pass."""
    positions: int | None = None
    """How many of the last post-instruction positions to record (null: all of the template's suffix)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size > 0, f"collect.batch_size must be > 0, got {self.batch_size}")
        require(
            self.positions is None or self.positions > 0,
            f"collect.positions must be > 0, got {self.positions}",
        )


@dataclass
class DirectionConfig:
    """How candidate directions are formed from the activation means."""

    projected: bool = False
    """Remove each difference of means' component along the baseline mean before normalising."""
    file: str | None = None
    """Use this direction instead of searching one: an MLflow run id (an abliterate run's chosen direction,
    a sweep run's best trial), runs:/<id>/<artifact path>, or a .safetensors (tensor "direction", as saved beside
    every abliterated checkpoint and in MLflow), .pt or .npy file, local or fsspec URL. Collection, scoring
    and selection are skipped; evaluation and orthogonalization run as usual. A sweep's
    best_trial.safetensors also carries its per-layer kernel weights, which the removal then follows."""


@dataclass
class HarnessConfig:
    """Capability benchmarks of EleutherAI's lm-evaluation-harness, run before and after the edit (the
    optional extra: pip install 'compalign[lmeval]')."""

    tasks: list[str] = field(default_factory=list)
    """Task names: compalign_everyday (bundled, runs offline) or any harness task (hellaswag, arc_easy,
    mmlu, ...: these download their datasets, so on a cluster). Empty: off."""
    limit: int | None = None
    """Documents per task (null: all)."""
    num_fewshot: int = 0
    batch_size: int = 8
    include_path: str | None = None
    """A folder of extra task YAMLs for the harness."""
    bootstrap_iters: int = 1000
    """Resamples of the harness's standard errors (0: none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            self.limit is None or self.limit > 0, f"eval.harness.limit must be > 0 or null, got {self.limit}"
        )
        require(self.num_fewshot >= 0, f"eval.harness.num_fewshot must be >= 0, got {self.num_fewshot}")
        require(self.batch_size > 0, f"eval.harness.batch_size must be > 0, got {self.batch_size}")
        require(
            self.bootstrap_iters >= 0,
            f"eval.harness.bootstrap_iters must be >= 0, got {self.bootstrap_iters}",
        )


@dataclass
class EvalConfig:
    """Before/after evaluation on the held-out test split."""

    max_new_tokens: int = 128
    """Greedy generation length per test prompt (long enough for a refusal after a compliant opening)."""
    batch_size: int = 16
    """Prompts per generation batch."""
    perplexity_text: str = "bundled:capability_heldout"
    """Held-out English text for perplexity: bundled:<name> (tasks/data/<name>.txt) or a file path/URL. The
    default, written for the project in nine genres (story, letter, news, how-to, science, dialogue,
    review, history, minutes), is about 6,100 SmolLM2 tokens."""
    perplexity_tokens: int = 8192
    """Score at most this many tokens of the text (the default text is scored whole)."""
    xstest: str | None = "auto"
    """Over-refusal (refusal concept only): an XSTest-style set (columns prompt, label: safe / unsafe; a
    file, URL or hf:<dataset>) whose safe prompts are answered before and after the edit. auto: the local
    copy named by $COMPALIGN_XSTEST, else ../shared/data/xstest_prompts.csv beside the project, else
    skipped with a note (the project does not ship XSTest); null: off."""
    xstest_limit: int | None = 20
    """Judge this many of its safe prompts, spread evenly over the file (it lists them type by type; 20:
    two of each of its ten types); null: all 250. Each prompt costs about 3 s before and after on 2 cores:
    50 took the default abliterate run past its 6 minutes."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """lm-evaluation-harness tasks on the model before and after (off by default)."""

    def __post_init__(self) -> None:
        require(self.max_new_tokens > 0, f"eval.max_new_tokens must be > 0, got {self.max_new_tokens}")
        require(
            self.xstest_limit is None or self.xstest_limit > 0,
            f"eval.xstest_limit must be > 0 or null, got {self.xstest_limit}",
        )
        require(self.xstest != "", "eval.xstest must be auto, null or a source, got an empty string")
        require(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        require(
            self.perplexity_tokens > 1, f"eval.perplexity_tokens must be > 1, got {self.perplexity_tokens}"
        )


@dataclass
class SplitEvalConfig(EvalConfig):
    """Evaluation on a split of the concept's prompts (abliterate, sweep)."""

    split: str = "test"
    """Prompts judged: test (the report), or val to compare settings (a search's knobs, these defaults)
    without reading the test split; the direction is chosen on val, so val figures flatter the edit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.split = choice(EvalSplit, self.split, "eval.split")


@dataclass
class ConceptRunConfig(RunConfig):
    """A run on one concept: the shared sections plus the concept's data, collection, directions and
    evaluation (the abliterate and sweep flows extend it)."""

    data: ConceptConfig = MISSING
    """The concept (config group conf/data: refusal, french)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    eval: SplitEvalConfig = field(default_factory=SplitEvalConfig)

    def __post_init__(self) -> None:
        # null: the concept's own default (data.model), else packaged:smollm2.
        self.model = concept_model(self.model, self.data)
