"""Every RayJob manifest's entrypoint against the Hydra configs: each override names a key or config group
the flow has, and the whole command composes into the flow's typed config with every check run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_manifests import CONF, _flow_of, _ids, _rayjobs, _rel


def _schema_fields(schema: str) -> set[str] | None:
    """Top-level keys of the typed config stored in Hydra's ConfigStore as ``schema`` by its flow."""
    import importlib

    from hydra.core.config_store import ConfigStore

    try:
        importlib.import_module(f"flows.{schema.removesuffix('_schema')}")  # registers the schema
        return set(ConfigStore.instance().load(f"{schema}.yaml").node.keys())
    except (ImportError, OSError):
        return None


def _conf_known(conf_file: Path, seen: set[Path] | None = None) -> tuple[set[str], set[str]]:
    """(top-level keys, config groups in the defaults list) of a Hydra primary config, following
    defaults entries that name other YAML files or ConfigStore schemas."""
    seen = seen if seen is not None else set()
    seen.add(conf_file)
    cfg = yaml.safe_load(conf_file.read_text()) or {}
    keys = {str(k) for k in cfg if k != "defaults"}
    groups: set[str] = set()
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, dict):
            for raw in entry:
                name = re.sub(r"^(override|optional)\s+", "", str(raw)).lstrip("/")
                groups.add(name.split("@")[0].split("/")[0])
        elif isinstance(entry, str) and entry != "_self_":
            name = entry.split("@")[0].lstrip("/")
            other = CONF / f"{name}.yaml"
            if "/" in name:
                groups.add(name.split("/")[0])
            elif other.is_file():
                if other not in seen:
                    more_keys, more_groups = _conf_known(other, seen)
                    keys |= more_keys
                    groups |= more_groups
            else:
                fields = _schema_fields(name)
                if fields is None:
                    pytest.skip(f"{_rel(conf_file)}: can't resolve defaults entry {name!r}")
                keys |= fields
    return keys, groups


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_overrides_match_conf(label, job):
    flow, tokens = _flow_of(job["spec"]["entrypoint"])
    conf_file = CONF / f"{flow}.yaml"
    if not conf_file.is_file():
        pytest.skip(f"conf/{flow}.yaml does not exist yet")
    keys, groups = _conf_known(conf_file)
    for token in tokens:
        if "=" not in token or token.startswith(("-", "+")):  # +key= adds keys on purpose
            continue
        key, value = token.split("=", 1)
        key = key.lstrip("~").split("@")[0]
        top = key.split(".")[0].split("/")[0]
        if top == "hydra":
            continue
        assert top in keys | groups, (
            f"{label}: `{token}`: conf/{flow}.yaml has no {top!r} key or config group"
        )
        # `group=option` picks conf/<group>/<option>.yaml, which must exist.
        if top in groups and key == top and "/" not in value and value != "null":
            assert (CONF / top / f"{value}.yaml").is_file(), f"{label}: `{token}`: no conf/{top}/{value}.yaml"


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_entrypoint_builds_a_valid_typed_config(label, job):
    """The entrypoint's overrides compose with the flow's Hydra config into its typed config, every
    __post_init__ check run (a wrong config group, such as an abliterate concept given to finetune, fails
    here instead of on a paid cluster). Nothing is loaded: models and data are only named."""
    import importlib

    from flows._common import to_config
    from tests.conftest import compose

    flow, tokens = _flow_of(job["spec"]["entrypoint"])
    module = importlib.import_module(f"flows.{flow}")  # registers the flow's schema
    schema = next(v for k, v in vars(module).items() if k.lower() == f"{flow}config")
    cfg = to_config(compose(flow, [t for t in tokens if not t.startswith("-")]), schema)
    assert cfg.ray.address == "auto", f"{label}: a RayJob must join its cluster (ray.address=auto)"
