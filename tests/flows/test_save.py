"""Step 9 in a flow of its own process: the streamed save runs when the model workers held every CPU of
the local Ray, and what it publishes is complete."""

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
        f"output.uri={tmp_path}/out",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.abliterate", *overrides], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        set(index["weight_map"].values()) == {"model.safetensors"} and "lm_head.weight" in index["weight_map"]
    )
    assert {"coverage.json", "direction.safetensors", "README.md", "config.json"} <= {
        p.name for p in out.iterdir()
    }
