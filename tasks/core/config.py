"""Typed configuration shared by the flows.

Values live in ``conf/*.yaml``; these dataclasses are the schema (each flow registers its own in
Hydra's ConfigStore, e.g. ``abliterate_schema`` in ``flows/abliterate.py``) and are built once per run with ``OmegaConf.to_object``,
which runs every ``__post_init__`` check. A check's message names the key and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from tasks.core.errors import require

PACKAGED_MODEL = "packaged:smollm2"
PACKAGED_REFUSAL_MODEL = "packaged:smollm2-refusal"
"""The packaged SmolLM2 with the shipped LoRA adapter that teaches it to refuse (tasks/data/fixtures)."""


def concept_model(model: str | None, concept: ConceptConfig) -> str:
    """The model a flow runs on: the top-level ``model`` when set, else the concept's, else the packaged one."""
    return model or concept.model or PACKAGED_MODEL


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    require(
        not math.isnan(value) and (0 < value <= 1 if low_open else 0 <= value < 1),
        f"{name} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value}",
    )


@dataclass
class ModelOptions:
    """How the model named by the top-level ``model`` key is loaded."""

    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id; part of the model's identity."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with a hub model. Off unless you trust the repository."""
    chat_template: str | None = None
    """Jinja chat template for a tokenizer that has none (otherwise the tokenizer's own is used)."""
    convert_cache: str | None = None
    """Directory where a GGUF model is converted to safetensors once (default ~/.cache/compalign/models)."""

    def __post_init__(self) -> None:
        require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model_options.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"model_options.device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
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
        require(
            self.kind in ("refusal", "language"),
            f"data.judge.kind must be refusal or language, got {self.kind!r}",
        )
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
class RayConfig:
    """Where Ray work runs."""

    address: str | None = None
    """null starts a local Ray; auto joins the cluster this process runs on; or ray://host:10001."""
    num_cpus: int | None = None
    """CPUs of a local Ray (null: all of this machine's). Ignored when joining a cluster."""
    pack_on_one_node: bool = False
    """Place all of one model's workers on one node (STRICT_PACK placement group)."""
    log_to_driver: bool = True
    """Forward worker logs to the driver (warnings and above reach it either way)."""

    def __post_init__(self) -> None:
        require(self.num_cpus is None or self.num_cpus > 0, f"ray.num_cpus must be > 0, got {self.num_cpus}")


@dataclass
class MlflowConfig:
    """Run tracking."""

    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: sqlite:///file.db (default, in the working directory) or http://server:5000.
    The flows' conf takes MLFLOW_TRACKING_URI from the environment when it is set."""
    experiment: str = "compalign"
    """Experiment name; every run of a flow (and every run of a multirun) lands in it."""
    run_name: str | None = None
    """Run name (default: flow, concept and model)."""
    checkpoint: str = "reference"
    """How the saved checkpoint is tracked: artifact (copied into MLflow), reference (its URI as a tag
    and a small JSON artifact) or none."""
    artifact_location: str | None = None
    """Where a new experiment stores its artifacts (s3://bucket/mlflow, written by this process with its
    own credentials); null: the store's default (./mlruns beside a sqlite store, or the server's
    --artifacts-destination, proxied through it). Only applies when the experiment is created."""

    def __post_init__(self) -> None:
        require(
            self.checkpoint in ("artifact", "reference", "none"),
            f"mlflow.checkpoint must be artifact, reference or none, got {self.checkpoint!r}",
        )


@dataclass
class StorageConfig:
    """Credentials and endpoint for fsspec URLs (s3://...). Secrets are read from the environment."""

    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...); default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS."""
    s3_region: str | None = None
    """Region; default: AWS_DEFAULT_REGION or the bucket's."""


@dataclass
class CollectConfig:
    """Activation collection and the Ray worker pool that also scores candidates."""

    workers: int = 2
    """Ray actors that each load the model once; prompts are sharded over them."""
    cpus_per_worker: float = 1
    """CPUs reserved per worker (also its torch thread count)."""
    gpus_per_worker: float = 0
    """GPUs per worker (1 on a GPU cluster)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    positions: int | None = None
    """How many of the last post-instruction positions to record (null: all of the template's suffix)."""

    def __post_init__(self) -> None:
        require(self.workers > 0, f"collect.workers must be > 0, got {self.workers}")
        require(self.cpus_per_worker > 0, f"collect.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        require(
            self.gpus_per_worker >= 0, f"collect.gpus_per_worker must be >= 0, got {self.gpus_per_worker}"
        )
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
class RefineConfig:
    """Gradient refinement of the chosen (or given) direction before it is removed (tasks/directions/refine.py):
    its ablation should take the behaviour away on the target prompts while moving the baseline prompts'
    next-token distribution as little as possible. Runs on the train split, so validation and test stay
    unseen. Worth it when no difference of means meets the KL limit (a fine-tuned behaviour)."""

    steps: int = 0
    """Adam steps on the direction (0: off, the difference of means is removed as found)."""
    lr: float = 0.02
    """Adam learning rate on the (renormalised) direction."""
    kl_weight: float = 10.0
    """Weight of the baseline KL against the behaviour term; higher keeps the model closer to unedited."""
    batch_size: int = 32
    """Prompts of each set per step (drawn with a seeded generator)."""
    seed: int = 0
    given: bool = False
    """Also refine a direction given by ``direction.file``. Off: a given direction is removed exactly as
    given, so that an edit found elsewhere composes unchanged; refinement applies to searched ones."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, f"refine.steps must be >= 0, got {self.steps}")
        require(math.isfinite(self.lr) and self.lr > 0, f"refine.lr must be a positive number, got {self.lr}")
        require(
            math.isfinite(self.kl_weight) and self.kl_weight >= 0,
            f"refine.kl_weight must be a number >= 0, got {self.kl_weight}",
        )
        require(self.batch_size > 0, f"refine.batch_size must be > 0, got {self.batch_size}")


@dataclass
class ScoreConfig:
    """Scoring of candidate directions on the validation prompts."""

    candidates_per_pass: int = 4
    """Candidates stacked into one forward pass (memory grows with it)."""
    batch_size: int = 16
    """Prompts per candidate in one forward pass."""
    induce_scale: float = 1.0
    """The induce score adds scale * (difference of means) at the direction's own layer."""
    max_prompts: int | None = None
    """Use at most this many validation prompts of each set (null: all)."""
    screen_prompts: int | None = 8
    """Two-stage search: first score every candidate on this many validation prompts of each set, then
    only the ``finalists`` best on all of them (null: score every candidate on all, one stage)."""
    finalists: int = 16
    """How many screened candidates are scored in full."""
    kl_prompts: str = "without_behaviour"
    """Baseline prompts the KL is averaged over: without_behaviour (those the unedited model does not meet
    with the behaviour: a tuned model's over-refusals of harmless requests should change, and are not
    damage) or all."""

    def __post_init__(self) -> None:
        require(
            self.candidates_per_pass > 0,
            f"score.candidates_per_pass must be > 0, got {self.candidates_per_pass}",
        )
        require(self.batch_size > 0, f"score.batch_size must be > 0, got {self.batch_size}")
        require(
            math.isfinite(self.induce_scale),
            f"score.induce_scale must be a finite number, got {self.induce_scale}",
        )
        require(
            self.max_prompts is None or self.max_prompts > 0,
            f"score.max_prompts must be > 0, got {self.max_prompts}",
        )
        require(
            self.screen_prompts is None or self.screen_prompts > 0,
            f"score.screen_prompts must be > 0 or null, got {self.screen_prompts}",
        )
        require(self.finalists > 0, f"score.finalists must be > 0, got {self.finalists}")
        require(
            self.kl_prompts in ("without_behaviour", "all"),
            f"score.kl_prompts must be without_behaviour or all, got {self.kl_prompts!r}",
        )


@dataclass
class SelectConfig:
    """Which candidate is chosen."""

    layer_cutoff: float = 0.8
    """Drop candidates from layers at or past this fraction of the depth (they tend to act on the output
    vocabulary rather than the concept). Must be in (0, 1]."""
    kl_limit: float = 0.2
    """Drop candidates whose ablation moves the baseline next-token distribution by more KL than this."""
    induce_min_gain: float = 1.0
    """Drop candidates whose addition raises the baseline prompts' behaviour log-odds by less than this
    over the unedited model's (1.0: odds at least e times higher). Relative, so that one value works for
    models that show the behaviour strongly or barely."""
    layer: int | None = None
    """Force this source layer (still ranked over positions); null searches all layers."""
    position: int | None = None
    """Force this position (negative index from the end, e.g. -1); null searches all positions."""
    min_behaviour: float = 0.2
    """Stop before collecting when the unedited model shows the behaviour on fewer than this share of the
    validation target prompts (judged on 32 generated tokens): there is nothing to remove. 0 skips it."""

    def __post_init__(self) -> None:
        _check_fraction("select.layer_cutoff", self.layer_cutoff)
        require(
            0 <= self.min_behaviour <= 1, f"select.min_behaviour must be in [0, 1], got {self.min_behaviour}"
        )
        require(
            not math.isnan(self.kl_limit) and self.kl_limit > 0,
            f"select.kl_limit must be > 0, got {self.kl_limit}",
        )
        require(not math.isnan(self.induce_min_gain), "select.induce_min_gain must be a number, got nan")
        require(self.layer is None or self.layer >= 0, f"select.layer must be >= 0, got {self.layer}")
        require(
            self.position is None or self.position < 0,
            f"select.position counts from the end and must be negative (e.g. -1), got {self.position}",
        )


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
        require(self.split in ("test", "val"), f"eval.split must be test or val, got {self.split!r}")


@dataclass
class OutputConfig:
    """Where the edited model goes."""

    uri: str | None = None
    """Local directory or fsspec URL (s3://bucket/prefix) of the checkpoint; null: checkpoints/<run id>."""
    save: bool = True
    """Save the orthogonalized model at all."""


@dataclass
class CacheConfig:
    """Content-addressed store of collected activation sums (keyed by model weights, prompts, positions, dtype)."""

    uri: str | None = "~/.cache/compalign/activations"
    """Local directory or fsspec URL (s3://bucket/cache); null turns the cache off."""
