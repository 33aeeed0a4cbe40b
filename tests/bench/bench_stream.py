"""Benchmark of the streamed orthogonalization on Ray (run by hand, not by CI):

    python tests/bench/bench_stream.py [--gb 3.2] [--shards 12] [--workers 2]

Writes a random Llama-shaped float32 checkpoint of ``--gb`` GB in ``--shards`` shards (tied embeddings),
then, in one run:
1. a plain read and write of the same files (the floor for any edit that rewrites them);
2. the streamed edit (tasks/directions/stream.py) as Ray tasks, ``--workers`` at a time, while a thread
   samples the resident memory (RSS) of this process and all its descendants (Ray's GCS, raylet, workers).
Prints the peak RSS of the whole process tree over the largest shard's size, the same for the rise above
the tree's idle level (Ray started, nothing running: the part that grows with the model), and the edit's
time over the plain read and write. Checks a few edited tensors against the in-memory formula.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that just ended
            total += p.memory_info().rss
    return total


class PeakSampler:
    def __init__(self, every_s: float = 0.05) -> None:
        self.peak, self.every, self._stop = 0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_checkpoint(folder: Path, gb: float, shards: int) -> tuple[int, dict]:
    """A random Llama-shaped checkpoint; returns (hidden, config)."""
    from safetensors.torch import save_file

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, round((gb * 1e9 - 4 * vocab * hidden) / per_layer))
    names = [("model.embed_tokens.weight", (vocab, hidden)), ("model.norm.weight", (hidden,))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)), (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]  # fmt: skip
    total = sum(4 * torch.Size(s).numel() for _, s in names)
    budget, groups, current, size = total / shards, [], [], 0
    for name, shape in names:
        current.append((name, shape))
        size += 4 * torch.Size(shape).numel()
        if size >= budget and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: torch.randn(s, generator=g) * 0.02 for n, s in group}, str(folder / shard), {"format": "pt"}
        )
        weight_map.update(dict.fromkeys((n for n, _ in group), shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": vocab, "tie_word_embeddings": True, "torch_dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return hidden, config


def _warm(wait_s: float) -> int:
    """What a shard task imports, so that the idle level counts the workers as they run."""
    import tasks.directions.stream  # noqa: F401

    time.sleep(wait_s)  # both tasks at once: two worker processes
    return 0


def plain_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    start = time.monotonic()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as i, open(dst / f.name, "wb") as o:
            while chunk := i.read(64 * 1024**2):
                o.write(chunk)
            o.flush()
            os.fsync(o.fileno())
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=3.2)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--make", help=argparse.SUPPRESS)  # only write the checkpoint into this folder
    args = parser.parse_args()
    if args.make:
        make_checkpoint(Path(args.make), args.gb, args.shards)
        return

    import ray

    from tasks.core.config import RayConfig
    from tasks.directions.stream import Edit, stream_checkpoint
    from tasks.runtime.cluster import init_ray
    from tasks.runtime.tasks import run_tasks

    work = Path(tempfile.mkdtemp(prefix="compalign-bench-stream-"))
    try:
        src = work / "src"
        src.mkdir()
        t0 = time.monotonic()
        # in a process of its own, so that this one's memory is not left grown by the random tensors
        make = [
            sys.executable,
            __file__,
            "--make",
            str(src),
            "--gb",
            str(args.gb),
            "--shards",
            str(args.shards),
        ]
        subprocess.run(make, check=True)
        config = json.loads((src / "config.json").read_text())
        hidden = config["hidden_size"]
        files = sorted(src.glob("*.safetensors"))
        largest = max(f.stat().st_size for f in files)
        total = sum(f.stat().st_size for f in files)
        print(f"checkpoint: {total / 1e9:.2f} GB in {len(files)} shards (largest {largest / 1e6:.0f} MB), "
              f"{config['num_hidden_layers']} layers, written in {time.monotonic() - t0:.0f} s")  # fmt: skip
        copy_s = plain_copy(src, work / "copy")
        shutil.rmtree(work / "copy")

        init_ray(RayConfig(num_cpus=args.workers, log_to_driver=False))
        # warm the worker processes (their imports), then take the idle level of the tree
        run_tasks(_warm, [(1.0,)] * args.workers, stage="warm up", unit="tasks")
        time.sleep(2)
        idle = tree_rss()
        r = torch.randn(hidden, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        edit = Edit((r / r.norm()).float())
        run = partial(run_tasks, stage="orthogonalize shards", unit="shards", on_this_node=True)
        with PeakSampler() as sampler:
            start = time.monotonic()
            done = stream_checkpoint(str(src), str(work / "out"), edit, "bench", run)
            stream_s = time.monotonic() - start
        ray.shutdown()

        check_tensors(src, work / "out", edit)
        print(f"streamed edit: {done.shards} shards, {len(done.coverage['edited'])} tensors edited, "
              f"{stream_s:.1f} s; plain read+write of the same files {copy_s:.1f} s")  # fmt: skip
        print(f"peak RSS of the process tree / largest shard:        {sampler.peak / largest:.2f} "
              f"({sampler.peak / 1e9:.2f} GB)")  # fmt: skip
        print(f"peak rise above the idle tree / largest shard:      {(sampler.peak - idle) / largest:.2f} "
              f"(idle tree {idle / 1e9:.2f} GB: driver, GCS, raylet, {args.workers} workers)")  # fmt: skip
        print(f"edit time / plain read+write:                       {stream_s / copy_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_tensors(src: Path, out: Path, edit) -> None:
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    source = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    r = edit.direction.double()
    for name, dim in [("model.layers.0.mlp.down_proj.weight", 0), ("model.embed_tokens.weight", 1)]:
        with safe_open(src / source[name], "pt") as f:
            before = f.get_tensor(name).double()
        with safe_open(out / index[name], "pt") as f:
            after = f.get_tensor(name)
        moved = before.movedim(dim, -1)
        expected = (moved - (moved @ r)[..., None] * r).movedim(-1, dim).float()
        assert torch.equal(after, expected), name
    with (
        safe_open(out / index["lm_head.weight"], "pt") as f,
        safe_open(src / source["model.embed_tokens.weight"], "pt") as g,
    ):
        assert torch.equal(f.get_tensor("lm_head.weight"), g.get_tensor("model.embed_tokens.weight"))


if __name__ == "__main__":
    main()
