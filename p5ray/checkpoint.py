"""The one checkpoint format: train writes it, evaluate / serve / batch-recommend / tune read it.

    CKPT/model.pt         state_dict (torch.load(weights_only=True): no arbitrary unpickling)
    CKPT/config.yaml      the full training Config
    CKPT/meta.json        model_version, epoch, metrics, model spec, data fingerprint, sha256 of files
    CKPT/items.parquet    item_idx, item_id, train_count, feature columns
    CKPT/users.parquet    user_idx, user_id, history (every known interaction), feature columns
    CKPT/train_state.pt   optimizer / scheduler / RNG / epoch (resume only; optional)

A checkpoint alone is enough to evaluate or serve. `save` writes into a temporary sibling and
renames it into place, so a directory named like a checkpoint is always complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from p5ray.config import Config, from_dict, to_dict
from p5ray.errors import CheckpointError
from p5ray.model import FeatureSpec, ModelSpec, P5Rec

FORMAT_VERSION = 1
FILES = ("model.pt", "config.yaml", "items.parquet", "users.parquet")


@dataclass
class Loaded:
    path: Path
    model: P5Rec
    config: Config
    meta: dict
    items: pa.Table
    users: pa.Table


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict) -> ModelSpec:
    data = dict(data)
    for key in ("item_features", "user_features"):
        data[key] = tuple(FeatureSpec(**f) for f in data.get(key, ()))
    data["tasks"] = tuple(data.get("tasks", ()))
    return ModelSpec(**data)


def vocab_fingerprint(items: pa.Table, users: pa.Table) -> str:
    """A short hash of the id -> index maps: a checkpoint only fits data with the same vocab."""
    h = hashlib.sha256()
    for table, idx, ids in ((items, "item_idx", "item_id"), (users, "user_idx", "user_id")):
        for i, s in zip(table.column(idx).to_pylist(), table.column(ids).to_pylist(), strict=True):
            h.update(f"{i}\t{s}\n".encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(
    path: str | Path,
    model: P5Rec,
    config: Config,
    items: pa.Table,
    users: pa.Table,
    meta: dict,
    train_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint at `path` (atomically: temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        pq.write_table(items, tmp / "items.parquet")
        pq.write_table(users, tmp / "users.parquet")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        meta = dict(meta)
        meta.setdefault("model_version", uuid.uuid4().hex[:12])
        meta["format_version"] = FORMAT_VERSION
        meta["spec"] = spec_to_dict(model.spec)
        meta["vocab_fingerprint"] = vocab_fingerprint(items, users)
        names = sorted(p.name for p in tmp.iterdir())
        meta["sha256"] = {name: _sha256(tmp / name) for name in names}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            "pass the path printed as `checkpoint: PATH` by `p5ray train`",
        )
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a p5ray checkpoint (no meta.json)")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_file} is truncated or not JSON") from None


def verify(path: str | Path, meta: dict) -> None:
    """Every file the checkpoint lists exists and has the recorded sha256."""
    path = Path(path)
    for name in FILES:
        if name not in meta.get("sha256", {}):
            raise CheckpointError(f"{path}: meta.json lists no checksum for {name}")
    for name, digest in meta["sha256"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing", "the checkpoint is incomplete")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"{path}: {name} does not match its recorded checksum",
                "the file was truncated or modified; use another checkpoint",
            )


def load(path: str | Path, device: str | torch.device = "cpu", verify_files: bool = True) -> Loaded:
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    if verify_files:
        verify(path, meta)
    config = from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    model = P5Rec(spec_from_dict(meta["spec"]))
    try:
        state = torch.load(path / "model.pt", map_location=device, weights_only=True)
        restore_feature_values(model, state)
        model.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"{path}/model.pt cannot be loaded: {exc}") from None
    model.to(device).eval()
    items = pq.read_table(path / "items.parquet")
    users = pq.read_table(path / "users.parquet")
    return Loaded(path, model, config, meta, items, users)


def restore_feature_values(model: P5Rec, state: dict) -> None:
    """Feature-value buffers take the saved shape (a multi-valued feature's width is data-dependent)."""
    for key, value in state.items():
        if ".values_" in key:
            module_path, name = key.rsplit(".", 1)
            setattr(model.get_submodule(module_path), name, torch.zeros_like(value))


def load_train_state(path: str | Path) -> dict | None:
    file = Path(path) / "train_state.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def load_for_resume(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(model state_dict, train state) of a checkpoint a run restarts from, checksums verified.

    A restart after a crash reads what the crashed run wrote: a truncated or modified file
    must stop the run with a clear line, not load half a model.
    """
    path = Path(path)
    verify(path, read_meta(path))
    try:
        state = load_train_state(path)
        weights = torch.load(path / "model.pt", map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects: nothing arbitrary runs
        raise CheckpointError(f"{path} cannot be resumed from: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if state is None:
        raise CheckpointError(f"{path} has no train_state.pt, so a run cannot resume from it",
                              "start a new run with --init-from it instead")
    return weights, state


def fits_data(meta: dict, data_items: pa.Table, data_users: pa.Table) -> bool:
    """Whether the id vocabularies of the data are the ones the checkpoint was trained on."""
    return vocab_fingerprint(data_items, data_users.select(["user_idx", "user_id"])) == meta["vocab_fingerprint"]


def check_fits_data(loaded: Loaded, data_items: pa.Table, data_users: pa.Table, data_dir: str) -> None:
    """Refuse to evaluate a checkpoint on data whose vocab differs from the one it was trained on."""
    if not fits_data(loaded.meta, data_items, data_users):
        raise CheckpointError(
            f"checkpoint {loaded.path} was trained on other data than {data_dir} (the id vocabularies differ)",
            "evaluate with the data directory the checkpoint was trained on",
        )
