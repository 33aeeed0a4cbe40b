"""Streaming orthogonalization: edit a sharded safetensors checkpoint shard by shard, one tensor in memory
at a time, into a new sharded checkpoint (index, config, tokenizer, model card), staged and published
atomically to a directory or an object store. Each shard is one pure call (``edit_shard``), run as a Ray
task by the runtime; a rerun after a crash skips the shards whose finished files still hash as recorded."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks.core import publish, storage
from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation
from tasks.core.model import file_sha256
from tasks.core.tensorfile import Output, read_header, read_tensor, write_file
from tasks.core.writers import Placement, place_all

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_CHUNK_ELEMENTS = 1 << 22  # float64 working set per step: 32 MB, whatever the tensor's size


@dataclass(frozen=True)
class Edit:
    """What to remove: ``direction`` (hidden,), optionally scaled per layer (``attn``/``mlp`` (layers,))
    and for the embedding (``embed``), as ``orthogonalize_weights`` takes them."""

    direction: torch.Tensor
    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    embed: float = 1.0

    def __post_init__(self) -> None:
        parts = [
            self.direction,
            *(t for t in (self.attn, self.mlp) if t is not None),
            torch.tensor(self.embed),
        ]
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise CompalignError(
                "the edit to stream holds NaN or inf (its direction or per-layer weights): refusing to write "
                "a checkpoint from it; check the direction file or the run that found it"
            )

    def weight(self, p: Placement) -> float:
        if p.kind == "embed":
            return float(self.embed)
        weights = self.attn if p.kind == "attn" else self.mlp
        return 1.0 if weights is None else float(weights[p.layer])

    def ablation(self, device: torch.device) -> Ablation:
        """The same edit as hooks on the residual writers' outputs (equal to the edited weights)."""
        return Ablation(self.direction.to(device), self.attn, self.mlp, float(self.embed))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.direction, self.attn, self.mlp):
            h.update(b"-" if t is None else t.detach().double().contiguous().numpy().tobytes())
        h.update(repr(float(self.embed)).encode())
        return h.hexdigest()


@dataclass
class Plan:
    """A source checkpoint read for streaming: its shards (file names), index and config."""

    source: str
    shards: list[str]
    config: dict
    weight_map: dict[str, str]
    other_files: list[str]
    """Files beside the weights (tokenizer, generation config, ...) copied as they are."""
    key: str
    """Identity of (source, edit): the staging folder and each shard's record carry it."""
    hidden: int = 0
    tied: bool = False
    """The LM head shares the input embedding and has no tensor of its own: the edit writes one."""


@dataclass
class ShardResult:
    name: str
    sha256: str
    edited: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    """Tensor name -> why it was not edited."""
    skipped: bool = False
    """Already written by an earlier, interrupted run (its hash matched)."""


def is_streamable(source: str) -> bool:
    """Whether ``source`` (a local folder or URL) is a safetensors checkpoint the streamed edit can read."""
    return any(storage.exists(storage.join(source, name)) for name in (INDEX, SINGLE))


def plan(source: str, edit: Edit) -> Plan:
    """Read the index and config of the checkpoint at ``source`` (no weights)."""
    config = json.loads(storage.read_bytes(storage.join(source, "config.json")))
    if storage.exists(storage.join(source, INDEX)):
        index_bytes = storage.read_bytes(storage.join(source, INDEX))
        weight_map = json.loads(index_bytes)["weight_map"]
    else:
        index_bytes, weight_map = b"single", {}
    shards = sorted(set(weight_map.values())) or [SINGLE]
    fs, root = storage.filesystem(source)
    listing = {p.rstrip("/").rsplit("/", 1)[-1]: info for p, info in _listing(fs, root).items()}
    missing = [s for s in shards if s not in listing]
    if missing:
        raise CompalignError(f"{source}: the index names shards that are not there: {', '.join(missing)}")
    others = sorted(
        n for n, info in listing.items()
        if info.get("type") == "file" and not n.endswith(_WEIGHTS) and n not in (INDEX, "config.json", "README.md")
    )  # fmt: skip
    h = hashlib.sha256(index_bytes + json.dumps(config, sort_keys=True).encode())
    for s in shards:
        h.update(f"{s}:{listing[s].get('size')}".encode())
    h.update(edit.fingerprint().encode())
    hidden = int(config.get("hidden_size") or config.get("text_config", {}).get("hidden_size", 0))
    if hidden <= 0:
        raise CompalignError(f"{source}/config.json has no hidden_size")
    if edit.direction.shape != (hidden,):
        raise CompalignError(
            f"direction has shape {tuple(edit.direction.shape)} but {source} has hidden size {hidden}"
        )
    tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in weight_map
    return Plan(source.rstrip("/"), shards, config, weight_map, others, h.hexdigest(), hidden, tied)


def _listing(fs, root: str) -> dict:
    return {info["name"]: info for info in fs.ls(root, detail=True)}


def stage_for(target: str, key: str) -> Path:
    """The staging folder of an edit of ``key`` published to ``target``: the same on a rerun (resume),
    next to a local target, in the temp folder for a remote one."""
    if storage.is_remote(target):
        return Path(tempfile.gettempdir()) / f"compalign-stream-{key[:16]}"
    path = storage.local_path(target)
    return path.with_name(f".{path.name}.partial-{key[:12]}")


def edit_shard(p: Plan, shard: str, stage: Path, edit: Edit) -> ShardResult:
    """Write the edited ``shard`` of ``p`` into ``stage`` (one tensor in memory at a time); skipped when an
    earlier run left it complete (its record's key and the file's hash match). Raises for a tensor whose
    role in the residual stream is unknown."""
    out, record = stage / shard, stage / f".{shard}.done.json"
    if out.exists() and record.exists():
        done = json.loads(record.read_text())
        if done.get("key") == p.key and done.get("sha256") == file_sha256(out):
            return ShardResult(shard, done["sha256"], done["edited"], done["left"], skipped=True)
    local, download = _local_copy(p, shard, stage)
    try:
        header = read_header(local)
        placed = place_all([(e.name, e.shape) for e in header.entries], p.hidden, f"{p.source}/{shard}")
        r = edit.direction.detach().to(torch.float64)
        outputs, result = [], ShardResult(shard, "")
        for entry, where in zip(header.entries, placed, strict=True):
            weight = edit.weight(where) if where.kind else 0.0
            if where.kind and weight != 0:
                outputs.append(
                    Output(
                        entry.name,
                        entry.dtype,
                        entry.shape,
                        produce=_edited(local, header, entry, where, r, weight),
                    )
                )
                result.edited.append(entry.name)
            else:
                outputs.append(Output(entry.name, entry.dtype, entry.shape, copy_from=(local, header, entry)))
                result.left[entry.name] = (
                    where.reason if not where.kind else f"per-layer weight 0 at layer {where.layer}"
                )
            if where.kind == "embed" and p.tied:  # the head keeps the unedited embedding as its own tensor
                outputs.append(
                    Output("lm_head.weight", entry.dtype, entry.shape, copy_from=(local, header, entry))
                )
                result.left["lm_head.weight"] = (
                    "output head: reads the final stream (untied from the embedding)"
                )
        partial = stage / f".{shard}.writing"
        write_file(partial, outputs, header.metadata or {"format": "pt"})
        partial.rename(out)
    finally:
        if download:
            local.unlink(missing_ok=True)
    result.sha256 = file_sha256(out)
    record.write_text(json.dumps({"key": p.key, **asdict(result)}, indent=1))
    return result


def _edited(path: Path, header, entry, where: Placement, r: torch.Tensor, weight: float):
    def produce() -> torch.Tensor:
        t = read_tensor(path, header, entry)
        remove_along(t, where.hidden_dim, r, weight)
        return t

    return produce


@torch.no_grad()
def remove_along(t: torch.Tensor, hidden_dim: int, r: torch.Tensor, weight: float) -> None:
    """In place: every vector v of ``t`` along ``hidden_dim`` becomes v - weight (v.r) r, computed in
    float64 a bounded block at a time (``r``: (hidden,) float64 unit vector)."""
    if t.dim() == 1:
        v = t.double()
        t.copy_((v - weight * (v @ r) * r).to(t.dtype))
        return
    if t.dim() > 2:  # experts (or any leading dims) one at a time
        if hidden_dim == 0:
            raise CompalignError(f"a {t.dim()}-D tensor with the hidden size at dim 0 is not a known layout")
        for sub in t.unbind(0):
            remove_along(sub, hidden_dim - 1, r, weight)
        return
    rows = t if hidden_dim == 1 else t.T  # (n, hidden) view
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        block = rows[i : i + step].double()
        block -= weight * (block @ r)[:, None] * r
        rows[i : i + step] = block.to(t.dtype)


def _local_copy(p: Plan, shard: str, stage: Path) -> tuple[Path, bool]:
    uri = storage.join(p.source, shard)
    if not storage.is_remote(uri):
        return storage.local_path(uri), False
    local = stage / f".{shard}.download"
    fs, path = storage.filesystem(uri)
    fs.get(path, str(local))
    return local, True


def finish(
    p: Plan, stage: Path, results: list[ShardResult], report: dict, card: str, extra_files: dict[str, bytes]
) -> None:
    """Write the index, the config (embeddings untied), the copied side files, the model card,
    ``extra_files`` and ``coverage.json`` into ``stage``."""
    weight_map = {}
    for res in results:
        for name in [*res.edited, *res.left]:
            weight_map[name] = res.name
    total = sum((stage / r.name).stat().st_size for r in results)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (stage / INDEX).write_text(json.dumps(index, indent=2))
    (stage / "config.json").write_text(json.dumps(dict(p.config, tie_word_embeddings=False), indent=2))
    for name in p.other_files:
        fs, path = storage.filesystem(storage.join(p.source, name))
        fs.get(path, str(stage / name))
    (stage / "coverage.json").write_text(json.dumps(report, indent=1))
    (stage / "README.md").write_text(card, encoding="utf-8")
    for name, data in extra_files.items():
        (stage / name).write_bytes(data)


def merged_coverage(results: list[ShardResult]) -> dict:
    """{"edited": [names], "left": {name: reason}} over all shards, sorted (as ``writers.coverage_report``)."""
    edited = sorted(n for r in results for n in r.edited)
    left = dict(sorted((n, why) for r in results for n, why in r.left.items()))
    return {"edited": edited, "left": left}


@dataclass
class Streamed:
    location: str
    coverage: dict
    shards: int
    skipped: int
    """Shards an earlier, interrupted run had already written."""


def in_process(fn, calls: list[tuple]) -> list:
    """The sequential runner (tests, a single machine without Ray): ``fn(*args)`` for each call."""
    return [fn(*args) for args in calls]


def stream_checkpoint(
    source: str,
    target: str,
    edit: Edit,
    card: str | Callable[[dict], str],
    run=in_process,
    extra_files: dict[str, bytes] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Streamed:
    """Edit every shard of the checkpoint at ``source`` (through ``run(fn, calls)``: in this process, or
    the runtime's Ray tasks) into a staging folder, add the index, config, side files, card and coverage,
    and publish it at ``target`` atomically (replacing what was there). ``card``: the model card, or a
    function of the coverage report giving it. ``check(stage)`` runs on the finished stage before it is
    published (raising keeps it unpublished). The stage survives a failure, so a rerun with the same
    source and edit skips the shards already written."""
    p = plan(source, edit)
    stage = stage_for(target, p.key)
    stage.mkdir(parents=True, exist_ok=True)
    results = run(edit_shard, [(p, shard, stage, edit) for shard in p.shards])
    skipped = sum(r.skipped for r in results)
    if skipped:
        log.info(
            "streamed edit: %d of %d shards were already written by an interrupted run", skipped, len(results)
        )
    report = merged_coverage(results)
    finish(p, stage, results, report, card(report) if callable(card) else card, extra_files or {})
    if check is not None:
        check(stage)
    for res in results:  # the records only serve a rerun of this stage
        (stage / f".{res.name}.done.json").unlink(missing_ok=True)
    location = publish.publish_dir(stage, target, overwrite=True)
    return Streamed(location, report, len(results), skipped)
