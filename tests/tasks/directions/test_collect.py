"""Activation sums: exact against a plain forward, independent of batching and sharding, constant memory."""

import torch

from tasks.core.prompts import format_chat
from tasks.directions.collect import ActivationSums, collect_activation_sums
from tests.conftest import make_tiny

PROMPTS = [
    "Tell me about the moon.",
    "How do I bake bread at home?",
    "Name three rivers in Europe.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves falling.",
]


def test_sums_match_hidden_states_of_single_prompts(tokenizer):
    model = make_tiny("llama", tokenizer)
    sums = collect_activation_sums(model, tokenizer, PROMPTS, positions=3, batch_size=2)
    assert sums.sums.shape == (model.config.num_hidden_layers + 1, 3, model.config.hidden_size)
    assert sums.sums.dtype == torch.float64 and sums.count == len(PROMPTS)
    expected = torch.zeros_like(sums.sums)
    last = {}
    handle = model.model.layers[-1].register_forward_hook(lambda _m, _a, out: last.update(out=out))
    for prompt in PROMPTS:  # one prompt at a time: no padding involved
        ids = tokenizer(
            format_chat(tokenizer, [prompt])[0], return_tensors="pt", add_special_tokens=False
        ).input_ids
        with torch.no_grad():
            out = model.model(ids, output_hidden_states=True)
        for layer in range(model.config.num_hidden_layers):  # hidden_states[i] enters layer i
            expected[layer] += out.hidden_states[layer][0, -3:].double()
        expected[-1] += last["out"][0, -3:].double()  # the stream after the last layer, before the final norm
    handle.remove()
    assert torch.allclose(sums.sums, expected, rtol=1e-5, atol=1e-5)


def test_batching_and_sharding_do_not_change_the_means(tokenizer):
    model = make_tiny("mixtral", tokenizer)
    whole = collect_activation_sums(model, tokenizer, PROMPTS, positions=4, batch_size=5)
    small = collect_activation_sums(model, tokenizer, PROMPTS, positions=4, batch_size=1)
    shards = [
        collect_activation_sums(model, tokenizer, part, 4, 2)
        for part in (PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:])
    ]
    merged = ActivationSums.merge(shards)
    scale = whole.mean().abs().max()
    assert merged.count == whole.count
    assert ((merged.mean() - whole.mean()).abs().max() / scale) < 1e-6
    assert ((small.mean() - whole.mean()).abs().max() / scale) < 1e-6


def test_result_size_does_not_grow_with_prompts(tokenizer):
    model = make_tiny("llama", tokenizer)
    few = collect_activation_sums(model, tokenizer, PROMPTS[:2], positions=2, batch_size=2)
    many = collect_activation_sums(model, tokenizer, PROMPTS * 8, positions=2, batch_size=8)
    assert few.sums.shape == many.sums.shape
    assert many.count == 40
