"""Every shipped flow config composes into its typed config, and holds only what differs from the
dataclass defaults (one source for every default): a YAML value equal to its default is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from flows._common import to_config
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[2] / "conf"


def _schemas() -> dict[str, type]:
    import flows.abliterate
    import flows.compare
    import flows.finetune
    import flows.replay
    import flows.sweep

    return {
        "abliterate": flows.abliterate.AbliterateConfig,
        "sweep": flows.sweep.SweepConfig,
        "finetune": flows.finetune.FinetuneConfig,
        "replay": flows.replay.ReplayConfig,
        "compare": flows.compare.CompareConfig,
    }


REQUIRED = {"replay": ["run_id=" + "a" * 32], "compare": ["runs=[" + "a" * 32 + "," + "b" * 32 + "]"]}
# Files of a flow's own config and the groups that set its keys at the top level (@package _global_).
FILES = {
    "abliterate": ["abliterate.yaml"],
    "sweep": ["sweep.yaml", "search/tpe.yaml", "search/grid.yaml"],
    "finetune": ["finetune.yaml"],
    "replay": ["replay.yaml"],
    "compare": ["compare.yaml"],
}


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("flow", list(FILES))
def test_shipped_config_composes_into_the_typed_config(flow):
    schema = _schemas()[flow]
    cfg = to_config(compose(flow, REQUIRED.get(flow, [])), schema)
    assert isinstance(cfg, schema)


@pytest.mark.parametrize("flow", list(FILES))
def test_yaml_holds_only_values_that_differ_from_the_defaults(flow):
    defaults = OmegaConf.to_container(OmegaConf.structured(_schemas()[flow]), resolve=False)
    restated = []
    for name in FILES[flow]:
        values = yaml.safe_load((CONF / name).read_text())
        for key, value in _leaves({k: v for k, v in values.items() if k not in ("defaults", "hydra")}):
            node = defaults
            for part in key.split("."):
                node = node[part]
            if node == value:
                restated.append(f"conf/{name}: {key}={value!r}")
    assert not restated, f"remove these (they equal the dataclass defaults): {restated}"


def test_runs_land_in_a_folder_named_after_the_flow():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _schemas()
    for flow in FILES:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            raw = hydra_compose(config_name=flow, overrides=REQUIRED.get(flow, []), return_hydra_config=True)
        assert raw.hydra.run.dir.startswith(f"outputs/{flow}/"), raw.hydra.run.dir
        assert raw.hydra.sweep.dir.startswith(f"multirun/{flow}/"), raw.hydra.sweep.dir
