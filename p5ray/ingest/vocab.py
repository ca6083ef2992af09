"""Raw string ids -> contiguous int32 indices 1..N (0 is padding), independent of file order.

New ids are numbered in the order of a keyed hash of their UTF-8 bytes
(BLAKE2b-64 keyed with the 8-byte little-endian seed; ties, never seen in practice, by the id),
so an item's index says nothing about when it first appeared (the P5 numbering leak) and the
numbering does not depend on how Ray Data cut or ordered the blocks. With a previous vocab
(`--vocab-from`) every known id keeps its index and new ids are appended, numbered the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from p5ray.errors import DataError

DEFAULT_SEED = 42


@dataclass(frozen=True)
class PreviousVocab:
    """Ids of an earlier prepared directory, in index order (ids[i] has index i + 1)."""

    users: list[str]
    items: list[str]
    seed: int
    features: dict = field(default_factory=dict)  # {"user": manifest entries, "item": ...}


def id_hash(ident: str, seed: int) -> int:
    key = seed.to_bytes(8, "little", signed=False)
    return int.from_bytes(
        hashlib.blake2b(ident.encode("utf-8"), digest_size=8, key=key).digest(), "big"
    )


def assign(ids: Iterable[str], seed: int, known: list[str] | None = None) -> list[str]:
    """All ids in index order: the known ones first (as they were), then new ones by keyed hash."""
    known = list(known or [])
    seen = set(known)
    new = sorted({i for i in ids if i not in seen}, key=lambda i: (id_hash(i, seed), i))
    return known + new


def load_previous(directory: str) -> PreviousVocab:
    """The vocab of an earlier `prepare` output; DataError when it is not one."""
    root = Path(directory)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(
            str(root), "not a prepared data directory (no manifest.json)", hint="check --vocab-from"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise DataError(str(manifest_path), f"unreadable manifest: {exc}") from exc
    users = _ids(root / "users.parquet", "user")
    items = _ids(root / "items.parquet", "item")
    features = {
        "user": manifest.get("user_features", {}),
        "item": manifest.get("item_features", {}),
    }
    return PreviousVocab(users, items, int(manifest.get("vocab_seed", DEFAULT_SEED)), features)


def _ids(path: Path, kind: str) -> list[str]:
    try:
        table = pq.read_table(path, columns=[f"{kind}_idx", f"{kind}_id"])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise DataError(str(path), f"cannot read the {kind} vocab: {exc}") from exc
    idx = table[f"{kind}_idx"].to_pylist()
    if idx != list(range(1, len(idx) + 1)):
        raise DataError(str(path), f"{kind}_idx is not 1..N in order")
    return table[f"{kind}_id"].to_pylist()
