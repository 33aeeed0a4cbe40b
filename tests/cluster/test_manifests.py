"""Static checks of the cluster configs under cluster/.

Nothing here talks to AWS or Kubernetes: the files are parsed and checked for
the mistakes that only show up once a cluster is being paid for: a Ray version
that differs from the pinned one, GPU counts that don't match the instance or
the group name, entrypoints that name a flow or config key that doesn't exist,
and credentials committed in plain text.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CONF = ROOT / "conf"
FLOWS = ROOT / "flows"

EXPECTED_FILES = [
    "aws.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-abliterate.yaml",
    "kuberay/rayjob-sweep.yaml",
    "kuberay/rayjob-finetune.yaml",
    "kuberay/rayjob-finetune-mixtral.yaml",
    "models/mixtral-8x7b-config.json",
]

# EC2 instance type -> (vCPUs, GPUs). Add a row when a config starts using a new type.
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "m6i.xlarge": (4, 0),
    "m6i.2xlarge": (8, 0),
    "m6i.4xlarge": (16, 0),
    "m7i.2xlarge": (8, 0),
    "r6i.2xlarge": (8, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6.2xlarge": (8, 1),
    "g6e.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}

GPU_RESOURCE = "nvidia.com/gpu"
IMAGE_KEYS = {"image", "head_image", "worker_image"}
AWS_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
ACCESS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
# `aws_secret_access_key: <value>` / `=<value>` with a literal value; values that
# start with `$`, `<` or `{` are references or placeholders, not secrets.
SECRET_KEY_RE = re.compile(
    r"aws_secret_access_key[\"']?[ \t]*[:=][ \t]*[\"']?(?![$<{])[^\s\"'#,}]+",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- helpers


def _pinned(name: str) -> str:
    """Version pinned with `name[...]==X` in pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: no tomllib, read the strings directly
        deps = re.findall(r"^\s*\"([^\"]+)\",?\s*$", text, re.MULTILINE)
    pattern = re.compile(rf"^{re.escape(name)}\s*(?:\[[^\]]*\])?\s*==\s*([^\s,;]+)")
    for dep in deps:
        match = pattern.match(dep.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml pins no exact {name}==X dependency")


RAY_VERSION = _pinned("ray")


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _all_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in _yaml_files():
        try:
            docs += [(path, doc) for doc in _load(path) if isinstance(doc, dict)]
        except yaml.YAMLError:
            continue  # reported by test_yaml_parses_to_mappings, not at collection
    return docs


def _walk(obj, path=()):
    """Yield (path, key, value) for every mapping entry, depth first."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path, key, value
            yield from _walk(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _walk(value, (*path, i))


def _is_aws_launcher(doc) -> bool:
    return isinstance(doc, dict) and (doc.get("provider") or {}).get("type") == "aws"


def _kind(doc) -> str | None:
    return doc.get("kind") if isinstance(doc, dict) else None


def _cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) for every RayCluster and every RayJob's rayClusterSpec."""
    specs = []
    for path, doc in _all_docs():
        name = f"{_rel(path)}:{(doc.get('metadata') or {}).get('name')}"
        if _kind(doc) == "RayCluster":
            specs.append((name, doc["spec"]))
        elif _kind(doc) == "RayJob" and "rayClusterSpec" in doc.get("spec", {}):
            specs.append((name, doc["spec"]["rayClusterSpec"]))
    return specs


def _rayjobs() -> list[tuple[str, dict]]:
    return [
        (f"{_rel(path)}:{doc['metadata']['name']}", doc)
        for path, doc in _all_docs()
        if _kind(doc) == "RayJob"
    ]


def _aws_configs() -> list[tuple[str, dict]]:
    return [(_rel(path), doc) for path, doc in _all_docs() if _is_aws_launcher(doc)]


def _ids(items) -> list[str]:
    return [label for label, _ in items]


def _pod_groups(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
    return groups


def _ray_container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    # KubeRay treats the first container as the Ray container.
    return containers[0]


def _gpus(container: dict, section: str = "limits") -> int:
    value = ((container.get("resources") or {}).get(section) or {}).get(GPU_RESOURCE, 0)
    return int(str(value))


def _flow_of(entrypoint: str) -> tuple[str, list[str]]:
    """('abliterate', [override tokens]) from 'python -m flows.abliterate a=b ...'."""
    tokens = shlex.split(entrypoint)
    assert len(tokens) >= 3 and re.fullmatch(r"python(3(\.\d+)?)?", tokens[0]) and tokens[1] == "-m", (
        f"entrypoint must be `python -m flows.<name> ...`, got {entrypoint!r}"
    )
    match = re.fullmatch(r"flows\.(\w+)", tokens[2])
    assert match, f"entrypoint must run a module under flows/, got {tokens[2]!r}"
    return match.group(1), tokens[3:]


def _overrides(tokens: list[str]) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in tokens if "=" in tok and not tok.startswith("-"))


# --------------------------------------------------------------------------- all files


def test_expected_files_exist():
    missing = [f for f in EXPECTED_FILES if not (CLUSTER / f).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses_to_mappings(path):
    docs = _load(path)
    assert docs, f"{_rel(path)} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: top level must be a mapping"
        assert _is_ray_config(doc) or doc.get("apiVersion") == "v1", (
            f"{_rel(path)}: neither a Ray cluster launcher config nor a KubeRay manifest"
        )
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", f"{_rel(path)}: use the ray.io/v1 CRDs"


def _is_ray_config(doc) -> bool:
    return _is_aws_launcher(doc) or str(doc.get("apiVersion", "")).startswith("ray.io/")


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_ray_images_use_pinned_version(path):
    docs = [doc for doc in _load(path) if _is_ray_config(doc)]
    if not docs:
        pytest.skip("no Ray cluster config in this file")
    images = [
        value for doc in docs for _, key, value in _walk(doc) if key in IMAGE_KEYS and isinstance(value, str)
    ]
    ray_images = [img for img in images if img.startswith(("rayproject/", "docker.io/rayproject/"))]
    assert ray_images, f"{_rel(path)}: no rayproject/* image found (images: {images})"
    for image in ray_images:
        assert ":" in image.rsplit("/", 1)[-1], f"{_rel(path)}: untagged image {image!r}"
        tag = image.rsplit(":", 1)[1]
        assert tag == RAY_VERSION or tag.startswith(f"{RAY_VERSION}-"), (
            f"{_rel(path)}: image {image!r} is not Ray {RAY_VERSION} (pinned in pyproject.toml)"
        )


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_ray_version_fields_match_pin(path):
    for doc in _load(path):
        for where, key, value in _walk(doc):
            if key == "rayVersion":
                assert str(value) == RAY_VERSION, (
                    f"{_rel(path)}: rayVersion at {'.'.join(map(str, where))} is {value!r}, "
                    f"pyproject.toml pins ray=={RAY_VERSION}"
                )


@pytest.mark.parametrize("label,spec", _cluster_specs(), ids=_ids(_cluster_specs()))
def test_every_cluster_spec_sets_ray_version(label, spec):
    assert str(spec.get("rayVersion")) == RAY_VERSION, f"{label}: rayVersion must be {RAY_VERSION!r}"


def _text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix not in {".zip", ".gz"})


@pytest.mark.parametrize("path", _text_files(), ids=_rel)
def test_no_literal_aws_credentials(path):
    text = path.read_text(errors="replace")
    assert not ACCESS_KEY_ID_RE.search(text), f"{_rel(path)}: contains an AWS access key id"
    match = SECRET_KEY_RE.search(text)
    assert not match, f"{_rel(path)}: literal secret access key: {match.group(0)!r}"
    # In manifests, credential env vars may only come from a Secret.
    for doc in _load(path) if path.suffix in {".yaml", ".yml"} else []:
        for where, key, value in _walk(doc):
            if key == "env" and isinstance(value, list):
                for var in value:
                    if var.get("name") in AWS_CREDENTIAL_VARS:
                        assert "value" not in var and "secretKeyRef" in (var.get("valueFrom") or {}), (
                            f"{_rel(path)}: {var['name']} at {'.'.join(map(str, where))} "
                            "must come from valueFrom.secretKeyRef"
                        )


# --------------------------------------------------------------------------- AWS launcher


@pytest.mark.parametrize("label,spec", _cluster_specs(), ids=_ids(_cluster_specs()))
def test_kuberay_groups(label, spec):
    for group_name, group in _pod_groups(spec):
        params = group.get("rayStartParams")
        assert isinstance(params, dict), f"{label}: {group_name} needs rayStartParams (may be empty)"
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{label}: rayStartParams is map[string]string, quote these values: {bad}"

        container = _ray_container(group)
        limits = (container.get("resources") or {}).get("limits") or {}
        assert {"cpu", "memory"} <= set(limits), (
            f"{label}: {group_name} needs cpu/memory limits (Ray sizes from them)"
        )
        requested = (container.get("resources") or {}).get("requests") or {}
        if GPU_RESOURCE in requested:
            assert _gpus(container, "requests") == _gpus(container), (
                f"{label}: {group_name}: {GPU_RESOURCE} requests must equal limits"
            )
        named = re.search(r"gpu-?(\d+)x", group_name)
        if named:
            assert _gpus(container) == int(named.group(1)), (
                f"{label}: group {group_name} limits {GPU_RESOURCE}={_gpus(container)}"
            )
        else:
            assert _gpus(container) == 0, f"{label}: {group_name} requests GPUs but its name says none"
        for var in container.get("env") or []:
            if "value" in var:
                assert isinstance(var["value"], str), f"{label}: env {var['name']} value must be a string"

        if group_name != "head":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", low)
            assert 0 <= low <= replicas <= high, f"{label}: {group_name} needs min <= replicas <= max"


# --------------------------------------------------------------------------- RayJobs


def test_rayjobs_present():
    assert len(_rayjobs()) >= 3, "expected RayJobs for abliterate, sweep and finetune"


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_entrypoint_runs_existing_flow(label, job):
    flow, tokens = _flow_of(job["spec"]["entrypoint"])
    assert (FLOWS / f"{flow}.py").is_file() or (FLOWS / flow / "__main__.py").is_file(), (
        f"{label}: flows/{flow}.py does not exist"
    )
    assert _overrides(tokens).get("ray.address") == "auto", f"{label}: pass ray.address=auto"


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_spec(label, job):
    spec = job["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{label}: shutdownAfterJobFinishes must be true"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    assert "rayClusterSpec" in spec, f"{label}: needs an embedded rayClusterSpec"


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_runtime_env(label, job):
    raw = job["spec"].get("runtimeEnvYAML")
    assert isinstance(raw, str), f"{label}: runtimeEnvYAML must be a string holding YAML"
    env = yaml.safe_load(raw)
    assert isinstance(env, dict) and env.get("working_dir"), f"{label}: runtime env needs a working_dir"
    if "://" in env["working_dir"]:
        assert env["working_dir"].endswith(".zip"), f"{label}: a remote working_dir must be a .zip"

    pip = env.get("pip") or []
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    for name in ("ray", "torch"):
        for pkg in packages if isinstance(packages, list) else []:
            match = re.match(rf"^{name}(\[[^\]]*\])?\s*==\s*(\S+)$", pkg.strip())
            if match:
                assert match.group(2) == _pinned(name), (
                    f"{label}: runtime env pins {pkg!r}, pyproject pins {_pinned(name)}"
                )

    runtime_env = pytest.importorskip("ray.runtime_env")
    runtime_env.RuntimeEnv(**env)  # Ray's own validation of the fields


@pytest.mark.parametrize("label,job", _rayjobs(), ids=_ids(_rayjobs()))
def test_rayjob_cluster_has_gpus_for_requested_workers(label, job):
    _, tokens = _flow_of(job["spec"]["entrypoint"])
    overrides = _overrides(tokens)
    groups = [g for name, g in _pod_groups(job["spec"]["rayClusterSpec"]) if name != "head"]
    per_pod = [_gpus(_ray_container(g)) for g in groups]
    total = sum(g.get("maxReplicas", 0) * n for g, n in zip(groups, per_pod, strict=True))
    for key, workers in overrides.items():
        prefix = key.removesuffix(".workers")
        if key.endswith(".workers") and f"{prefix}.gpus_per_worker" in overrides:
            per_worker = float(overrides[f"{prefix}.gpus_per_worker"])
            assert per_worker <= max(per_pod, default=0), (
                f"{label}: no pod has {per_worker} GPUs for {prefix}"
            )
            needed = int(workers) * per_worker
            assert needed <= total, (
                f"{label}: {key}={workers} needs {needed:g} GPUs, cluster has at most {total}"
            )
