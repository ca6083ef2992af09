"""Shared fixtures: one Ray for the session, real bundled data prepared once, one tiny trained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import DATA, TINY


@pytest.fixture(scope="session")
def ray_session():
    from p5ray.raycluster import ensure_ray

    ensure_ray(2)
    yield
    import ray

    ray.shutdown()


def _prepare(src: Path, out: Path, fmt: str = "auto") -> Path:
    from p5ray import prepare

    prepare.run(prepare.PrepareOptions(input=str(src), out=str(out), format=fmt))
    return out


@pytest.fixture(scope="session")
def ml100k_data(tmp_path_factory, ray_session) -> Path:
    """The whole bundled MovieLens-100K, prepared by the real pipeline."""
    return _prepare(DATA / "ml-100k" / "u.data", tmp_path_factory.mktemp("ml100k") / "data")


@pytest.fixture(scope="session")
def ml_small_data(tmp_path_factory, ray_session) -> Path:
    """The first 150 users of MovieLens-100K (real rows, real features), prepared."""
    root = tmp_path_factory.mktemp("mlsmall")
    src = root / "ml-small"
    src.mkdir()
    keep = {str(u) for u in range(1, 151)}
    with open(DATA / "ml-100k" / "u.data") as f, open(src / "u.data", "w") as out:
        out.writelines(line for line in f if line.split("\t", 1)[0] in keep)
    for name in ("u.item", "u.user"):
        (src / name).write_bytes((DATA / "ml-100k" / name).read_bytes())
    return _prepare(src / "u.data", root / "data")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, ml_small_data) -> Path:
    """A model trained for real (Ray Train, 2 workers, tiny config) on the small data."""
    from p5ray import train
    from p5ray.config import load_config

    cfg = load_config(TINY, ["train.epochs=2"])
    result = train.fit(str(ml_small_data), cfg, storage=str(tmp_path_factory.mktemp("runs")), name="tiny")
    return Path(result.checkpoint)
