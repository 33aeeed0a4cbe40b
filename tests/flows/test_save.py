"""Step 9 in a flow of its own process: the streamed save runs when the model workers held every CPU of
the local Ray, and what it publishes is complete; the workers' models are split between memory and disk
offload, and the whole flow runs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, tiny_flow_overrides


def test_the_save_gets_the_cpus_the_model_workers_held(tiny_dirs, tmp_path):
    overrides = [
        *tiny_flow_overrides(tiny_dirs["llama"], tmp_path),
        "ray.num_cpus=2",  # both taken by the two model workers' placement group
        "collect.workers=2",
        # Each worker's model split: the embedding and a layer in memory, the rest offloaded to disk (the
        # path of a worker spanning GPUs); the save's check compares it with the streamed checkpoint.
        "model_options.max_memory={cpu:12900000}",
        f"output.uri={tmp_path}/out",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.abliterate", *overrides], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "offloaded to the disk" in done.stderr  # accelerate says so: the workers' models were split
    out = Path(tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        set(index["weight_map"].values()) == {"model.safetensors"} and "lm_head.weight" in index["weight_map"]
    )
    assert {"coverage.json", "direction.safetensors", "README.md", "config.json"} <= {
        p.name for p in out.iterdir()
    }
