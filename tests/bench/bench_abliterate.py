"""Benchmark of the abliterate flow's two hot loops on the packaged SmolLM2 (run by hand, not by CI):

    python tests/bench/bench_abliterate.py [--threads 2] [--candidates 8]

Prints ratios measured in this one run:
  1. activation collection with all-layer hooks / the same batches through a bare forward (aim <= 1.10);
  2. candidate scoring cost per candidate in units of one bare forward pass over the validation set, and
     the speed-up of the batched scorer over the plain one-candidate-at-a-time loop (aim >= 3x), for the
     scorer alone and for the flow's default two-stage scoring (screen, then finalists);
  3. peak memory (max RSS of a fresh process) of collection at 64 and 512 prompts (must be about equal).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def prompts(name: str, n: int) -> list[str]:
    rows = [
        json.loads(line)["instruction"] for line in (SHARED / name).read_text().splitlines() if line.strip()
    ]
    return (rows * (n // len(rows) + 1))[:n]


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_collection(loaded, batch_size: int) -> None:
    import copy

    from tasks.core.forward import (
        chunks,
        left_pad,
        pad_id,
        positions_from_mask,
        prefix_cache,
        split_shared_prefix,
        tokenize,
    )
    from tasks.core.prompts import format_chat
    from tasks.directions.collect import collect_activation_sums

    model, tok = loaded.model, loaded.tokenizer
    texts = prompts("harmless_train.jsonl", 64)
    seqs = tokenize(tok, format_chat(tok, texts))
    split = split_shared_prefix(seqs, keep=6)
    order = sorted(range(len(seqs)), key=lambda i: (len(split.rest[i]), split.rest[i]))
    batches = [
        left_pad([split.rest[i] for i in b], pad_id(tok), loaded.device) for b in chunks(order, batch_size)
    ]
    full = [left_pad([seqs[i] for i in b], pad_id(tok), loaded.device) for b in chunks(order, batch_size)]

    @torch.inference_mode()
    def bare():  # the same work as collection (shared prefix from the KV cache), without the hooks
        shared = prefix_cache(model, split.prefix, 1, 1)
        for ids, mask in batches:
            cache = copy.deepcopy(shared)
            cache.batch_repeat_interleave(ids.shape[0])
            full_mask = torch.cat([mask.new_ones(ids.shape[0], split.prefix_len), mask], dim=1)
            positions = positions_from_mask(mask, offset=split.prefix_len)
            model.model(
                input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True
            )

    @torch.inference_mode()
    def plain():  # whole prompts, no prefix reuse
        for ids, mask in full:
            model.model(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
            )

    hooked = timed(lambda: collect_activation_sums(model, tok, texts, 6, batch_size))
    bare_s, plain_s = timed(bare), timed(plain)
    print(
        f"1. collection, 64 prompts x 31 hook points x 6 positions: hooked/bare = {hooked / bare_s:.3f} "
        f"(aim <= 1.10); hooked collection / plain whole-prompt forward = {hooked / plain_s:.3f}"
    )


def bench_scoring(loaded, n_candidates: int) -> None:
    """Candidates as the flow builds them: source layers spread over those below the default cut-off
    (0.8 of the depth), validation sets of the bundled concepts' size (24 + 24)."""
    from tasks.core.contrast import behaviour_token_ids
    from tasks.core.forward import chunks, left_pad, pad_id, positions_from_mask, tokenize
    from tasks.core.model import num_layers
    from tasks.core.prompts import format_chat
    from tasks.directions.candidates import difference_of_means
    from tasks.directions.collect import collect_activation_sums
    from tasks.directions.config import SelectConfig
    from tasks.directions.score import CandidateScorer, build_candidates, reference_scores, scorable_layers
    from tasks.directions.select import pick_finalists

    model, tok = loaded.model, loaded.tokenizer
    target, baseline = prompts("harmful_val.jsonl", 24), prompts("harmless_val.jsonl", 24)
    directions = difference_of_means(
        collect_activation_sums(model, tok, prompts("harmful_train.jsonl", 32), 6, 16),
        collect_activation_sums(model, tok, prompts("harmless_train.jsonl", 32), 6, 16),
    )
    layers = scorable_layers(num_layers(model), 0.8)[1:]  # layer 0 (embeddings) has no direction at -1
    spread = [layers[round(i * (len(layers) - 1) / (n_candidates - 1))] for i in range(n_candidates)]
    cands = build_candidates(directions, spread, [-1], 1.0)
    ids = behaviour_token_ids(tok, ["I", "Sorry", "As"])

    @torch.inference_mode()
    def bare():
        seqs = tokenize(tok, format_chat(tok, target + baseline))
        for group in chunks(seqs, 16):
            ids_, mask = left_pad(group, pad_id(tok), loaded.device)
            model(input_ids=ids_, attention_mask=mask, position_ids=positions_from_mask(mask))

    unit = timed(bare)
    scorer = CandidateScorer(model, tok, target, baseline, ids, batch_size=16, candidates_per_pass=4)
    fast = timed(lambda: scorer.score(cands), repeat=1) / len(cands)
    slow = timed(
        lambda: reference_scores(model, tok, target, baseline, ids, cands, batch_size=16), repeat=1
    ) / len(cands)
    print(
        f"2. scoring ({len(target)}+{len(baseline)} validation prompts, {len(cands)} candidates at layers "
        f"{spread}): {fast / unit:.2f} bare forward passes per candidate (plain loop: {slow / unit:.2f}); "
        f"speed-up {slow / fast:.2f}x (aim >= 3x)"
    )

    # The flow's default two-stage scoring: every candidate on 8 prompts per set, the 16 best on all.
    every = build_candidates(directions, layers[::2], [-1, -2, -3], 1.0)
    start = time.perf_counter()
    screen = CandidateScorer(model, tok, target[:8], baseline[:8], ids, batch_size=16, candidates_per_pass=4)
    first = screen.score(every)
    keep = pick_finalists(first, num_layers(model), SelectConfig(), screen.clean_baseline_log_odds, 16)
    scorer.score([every[i] for i in keep])
    staged = (time.perf_counter() - start) / len(every)
    print(
        f"   two-stage (screen on 8+8, 16 finalists on all; {len(every)} candidates): "
        f"{staged / unit:.2f} bare forward passes per candidate, speed-up {slow / staged:.2f}x over the plain loop"
    )


def peak_rss_child(n: int, threads: int) -> float:
    code = f"""
import resource, sys, torch, json
sys.path.insert(0, {str(REPO)!r})
torch.set_num_threads({threads})
from tests.bench.bench_abliterate import prompts
from tasks.core.config import ModelOptions
from tasks.core.model import load_model
from tasks.directions.collect import collect_activation_sums
loaded = load_model("packaged:smollm2", ModelOptions())
collect_activation_sums(loaded.model, loaded.tokenizer, prompts("harmless_train.jsonl", {n}), 6, 16)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tasks.core.config import ModelOptions
    from tasks.core.logs import quiet_libraries
    from tasks.core.model import load_model

    quiet_libraries()
    loaded = load_model("packaged:smollm2", ModelOptions())
    print(f"SmolLM2-135M-Instruct, {loaded.dtype}, {args.threads} threads")
    bench_collection(loaded, batch_size=16)
    bench_scoring(loaded, args.candidates)
    small, large = peak_rss_child(64, args.threads), peak_rss_child(512, args.threads)
    print(
        f"3. collection peak RSS: 64 prompts {small:.0f} MiB, 512 prompts {large:.0f} MiB, ratio {large / small:.3f}"
    )


if __name__ == "__main__":
    main()
