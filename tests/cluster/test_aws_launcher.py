"""The Ray cluster launcher config for AWS (cluster/aws/): it passes Ray's own validation, its node
types match their instance types, GPU nodes run a GPU image, and its commands install the project and
start Ray."""

from __future__ import annotations

import copy
import re

import pytest

from tests.cluster.test_manifests import INSTANCE_TYPES, _aws_configs, _ids


def test_aws_config_present():
    assert _aws_configs(), "no Ray cluster launcher config with provider.type: aws under cluster/"


@pytest.mark.parametrize("label,config", _aws_configs(), ids=_ids(_aws_configs()))
def test_aws_config_passes_ray_validation(label, config):
    util = pytest.importorskip("ray.autoscaler._private.util")
    # The same steps `ray up` runs before touching AWS: merge defaults, check the schema.
    util.validate_config(util.prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("label,config", _aws_configs(), ids=_ids(_aws_configs()))
def test_aws_node_types_match_instance_types(label, config):
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types, f"{label}: head_node_type is not a node type"
    for name, node_type in node_types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{label}: add {instance!r} to INSTANCE_TYPES in this test"
        vcpus, gpus = INSTANCE_TYPES[instance]
        resources = node_type.get("resources") or {}
        assert "CPU" in resources, f"{label}: {name} must declare its CPU resources"
        assert 0 <= resources["CPU"] <= vcpus, (
            f"{label}: {name} declares {resources['CPU']} CPUs, {instance} has {vcpus}"
        )
        if gpus or "GPU" in resources:
            assert resources.get("GPU") == gpus, (
                f"{label}: {name} declares GPU={resources.get('GPU')}, {instance} has {gpus}"
            )
        named = re.search(r"gpu_?(\d+)x", name)
        if named:
            assert int(named.group(1)) == gpus, f"{label}: node type {name} runs on {instance} ({gpus} GPUs)"
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", config["max_workers"])
        assert 0 <= low <= high, f"{label}: {name} has min_workers {low} > max_workers {high}"


@pytest.mark.parametrize("label,config", _aws_configs(), ids=_ids(_aws_configs()))
def test_aws_gpu_nodes_run_a_gpu_image(label, config):
    docker = config.get("docker") or {}
    gpu_types = [
        n
        for n, t in config["available_node_types"].items()
        if INSTANCE_TYPES.get(t["node_config"]["InstanceType"], (0, 0))[1]
    ]
    if not gpu_types or not docker:
        pytest.skip("no GPU node types or no docker section")
    image = docker.get("worker_image") or docker["image"]
    assert re.search(r"-(gpu|cu\d+)\b", image), f"{label}: GPU nodes need a CUDA image, got {image!r}"


@pytest.mark.parametrize("label,config", _aws_configs(), ids=_ids(_aws_configs()))
def test_aws_commands_install_project_and_start_ray(label, config):
    def home(p: str) -> str:
        return p.replace("$HOME", "~").replace("/home/ray", "~").rstrip("/")

    mounts = {home(remote) for remote in (config.get("file_mounts") or {})}
    setup = [home(cmd) for cmd in config.get("setup_commands", [])]
    assert any("pip install" in cmd and any(m in cmd for m in mounts) for cmd in setup), (
        f"{label}: setup_commands must pip-install the mounted project ({sorted(mounts)})"
    )
    head = " ".join(config["head_start_ray_commands"])
    # Without the bootstrap config the head starts but never scales the worker pools.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, (
        f"{label}: head lacks --autoscaling-config"
    )
    assert "--head" in head and "--dashboard-host" in head
    assert "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])


# --------------------------------------------------------------------------- KubeRay
