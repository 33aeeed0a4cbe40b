"""A model split over devices (here: CPU memory and disk offload, the path a worker spanning GPUs takes)
collects, scores and ablates exactly as the whole model does; quantization is refused off CUDA."""

import copy

import pytest
import torch

from tasks.core.config import ModelOptions, Resources
from tasks.core.contrast import behaviour_token_ids
from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, intervene
from tasks.core.model import load_model
from tasks.core.placement import placement_options, placement_summary
from tasks.directions.candidates import difference_of_means
from tasks.directions.collect import collect_activation_sums
from tasks.directions.orthogonalize import orthogonalize_weights
from tasks.directions.score import CandidateScorer, build_candidates

TARGET = ["Bonjour, comment vas-tu ?", "Quelle heure est-il ?", "Où est la gare ?", "Parle-moi de Paris."]
BASELINE = ["Hello, how are you?", "What time is it?", "Where is the station?", "Tell me about London."]


def _split_options(tmp_path, folder) -> ModelOptions:
    """A CPU budget of the embedding and about two decoder layers: the rest of the stack goes to disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    size = {name: sum(p.numel() * 4 for p in m.parameters()) for name, m in model.model.named_children()}
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    budget = size["embed_tokens"] + 2 * layer
    return ModelOptions(max_memory={"cpu": str(budget)}, offload_folder=str(tmp_path / "offload"))


def _scores(loaded, sums_t, sums_b):
    ids = behaviour_token_ids(loaded.tokenizer, ["Bon", "Je", "Il"])
    cands = build_candidates(difference_of_means(sums_t, sums_b), [1, 2, 3], [-1, -2], induce_scale=4.0)
    scorer = CandidateScorer(loaded.model, loaded.tokenizer, TARGET, BASELINE, ids, batch_size=3)
    return scorer.score(cands)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_split_model_collects_scores_and_ablates_as_the_whole_one(kind, tiny_dirs, tmp_path):
    whole = load_model(str(tiny_dirs[kind]), ModelOptions())
    split = load_model(str(tiny_dirs[kind]), _split_options(tmp_path, tiny_dirs[kind]))
    placed = split.model.hf_device_map
    assert placed.get("model.layers.0") == "cpu" and placed.get("model.layers.2") == "disk", placed
    counts = {d: sum(v == d for v in placed.values()) for d in ("cpu", "disk")}
    assert (
        placement_summary(split.model) == f"{counts['cpu']} modules on cpu, {counts['disk']} modules on disk"
    )
    assert placement_summary(whole.model) == "all on cpu"
    sums = {}
    for name, loaded in (("whole", whole), ("split", split)):
        t = collect_activation_sums(loaded.model, loaded.tokenizer, TARGET, 2, 3)
        b = collect_activation_sums(loaded.model, loaded.tokenizer, BASELINE, 2, 3)
        sums[name] = (t, b)
    for a, b in zip(sums["whole"], sums["split"], strict=True):
        assert torch.allclose(a.mean(), b.mean(), rtol=1e-5, atol=1e-7)
    fast, slow = _scores(whole, *sums["whole"]), _scores(split, *sums["split"])
    for a, b in zip(fast, slow, strict=True):
        for field in ("bypass", "induce", "kl"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5, abs=1e-7), field
    # The split model's hooked ablation equals the whole model with the direction baked into its weights.
    r = difference_of_means(*sums["whole"]).get(2, -1)
    ids = torch.randint(0, whole.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    baked = copy.deepcopy(whole.model)
    orthogonalize_weights(baked, r)
    with torch.no_grad(), intervene(split.model, ablation=Ablation(direction=r)):
        hooked = split.model(ids).logits
    with torch.no_grad():
        expected, clean = baked(ids).logits, whole.model(ids).logits
    assert (hooked - expected).abs().max() < 1e-4
    assert (hooked - clean).abs().max() > 1e-2


def test_quantization_is_refused_off_cuda_naming_the_key():
    with pytest.raises(CompalignError, match=r"model_options.quantization=bnb_4bit runs on CUDA only"):
        ModelOptions(quantization="bnb_4bit", device="cpu")
    opts = ModelOptions(quantization="bnb_8bit")  # device auto: the worker's device decides
    with pytest.raises(CompalignError, match=r"model_options.quantization=bnb_8bit .* use model_options"):
        placement_options(opts, torch.device("cpu"), torch.float32)
    with pytest.raises(CompalignError, match="model_options.quantization must be none, bnb_4bit or bnb_8bit"):
        ModelOptions(quantization="gptq")


def test_options_say_how_the_model_is_placed(tmp_path):
    cpu = torch.device("cpu")
    assert placement_options(ModelOptions(), cpu, torch.float32) == {}
    split = placement_options(
        ModelOptions(max_memory={"0": "70GiB", "cpu": "100GiB"}, offload_folder=str(tmp_path)),
        cpu,
        torch.float32,
    )
    assert split == {
        "device_map": "auto",
        "max_memory": {0: "70GiB", "cpu": "100GiB"},
        "offload_folder": str(tmp_path),
    }
    with pytest.raises(CompalignError, match="model_options.max_memory keys are GPU numbers, cpu or disk"):
        ModelOptions(max_memory={"gpu0": "1GiB"})
    with pytest.raises(CompalignError, match="collect.gpus_per_worker above 1 must be a whole number"):
        type("C", (Resources,), {"key": "collect"})(gpus_per_worker=1.5)
    assert Resources(gpus_per_worker=0.5).gpus_per_worker == 0.5  # a share of one GPU stays allowed


def test_split_model_runs_trials_and_refinement_as_the_whole_one(tiny_dirs, tmp_path):
    from tasks.directions.config import RefineConfig
    from tasks.directions.refine import refine_direction
    from tasks.sweep.trial import build_edit
    from tasks.sweep.trials import TrialEvaluator
    from tests.tasks.sweep.test_trials import TRIALS

    whole = load_model(str(tiny_dirs["llama"]), ModelOptions())
    split = load_model(str(tiny_dirs["llama"]), _split_options(tmp_path, tiny_dirs["llama"]))
    sums = [collect_activation_sums(whole.model, whole.tokenizer, p, 2, 4) for p in (TARGET, BASELINE)]
    candidates = difference_of_means(*sums)
    ids = behaviour_token_ids(whole.tokenizer, ["Bon", "Je", "Il"])
    results = {}
    for name, loaded in (("whole", whole), ("split", split)):
        ev = TrialEvaluator(loaded.model, loaded.tokenizer, TARGET, BASELINE, ids, batch_size=3, rate="top1")
        trials = [ev.evaluate(build_edit(t, candidates), t.number) for t in TRIALS[:4]]
        cfg = RefineConfig(steps=3, lr=0.05, kl_weight=1.0, batch_size=4)
        refined = refine_direction(
            loaded.model, loaded.tokenizer, candidates.get(2, -1), TARGET, BASELINE, ids, cfg
        )
        results[name] = trials, refined
    for a, b in zip(results["whole"][0], results["split"][0], strict=True):
        assert b.mean_log_odds == pytest.approx(a.mean_log_odds, rel=1e-5, abs=1e-6)
        assert b.kl == pytest.approx(a.kl, rel=1e-5, abs=1e-7)
    assert torch.allclose(results["whole"][1].direction, results["split"][1].direction, atol=1e-5)


def test_quantized_and_multi_gpu_placement_on_cuda(monkeypatch):
    """What a CUDA worker asks transformers for (the environment is faked: no GPU here; the load itself
    is in tests/gpu)."""
    import importlib.util

    cuda = torch.device("cuda")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(
        CompalignError, match=r"model_options.quantization=bnb_4bit needs bitsandbytes: pip install"
    ):
        placement_options(ModelOptions(quantization="bnb_4bit"), cuda, torch.bfloat16)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    four = placement_options(ModelOptions(quantization="bnb_4bit"), cuda, torch.bfloat16)
    q = four["quantization_config"]
    assert four["device_map"] == {"": cuda} and set(four) == {"device_map", "quantization_config"}
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    eight = placement_options(ModelOptions(quantization="bnb_8bit"), cuda, torch.bfloat16)[
        "quantization_config"
    ]
    assert eight.load_in_8bit and not eight.load_in_4bit
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement_options(ModelOptions(), cuda, torch.bfloat16) == {"device_map": "balanced"}
    assert placement_options(ModelOptions(), torch.device("cuda:1"), torch.bfloat16) == {}  # one named GPU
    both = placement_options(ModelOptions(quantization="bnb_8bit"), cuda, torch.bfloat16)
    assert both["device_map"] == "balanced" and both["quantization_config"].load_in_8bit
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert placement_options(ModelOptions(), cuda, torch.bfloat16) == {}
