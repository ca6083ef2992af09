"""Connecting to Ray: an embedded local Ray on a laptop, or the cluster at RAY_ADDRESS."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data's per-dataset execution logs
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # print() in workers is not re-logged (no duplicates)
    "RAY_DEDUP_LOGS": "1",
}


def verbose() -> bool:
    """--verbose sets P5RAY_VERBOSE=1: Ray's own INFO logs are then shown."""
    return os.environ.get("P5RAY_VERBOSE") == "1"


def train_logging_config():
    """Ray Train's LoggingConfig for RunConfig: warnings only unless --verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def ensure_ray(min_cpus: int = 2) -> None:
    """Start (or join) Ray once per process.

    Locally, Ray gets at least `min_cpus + 2` logical CPUs so Ray Data tasks never starve while the
    training workers hold theirs (logical CPUs are bookkeeping; threads are set per worker).
    With RAY_ADDRESS set (a cluster, or inside a Ray Job) it connects there instead.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    quiet = not verbose()
    level = "WARNING" if quiet else "INFO"
    if quiet:  # inherited by the local raylet and so by every Ray worker process
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    kwargs = {
        "logging_level": level,
        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level=level),
        "log_to_driver": True,
    }
    if address:
        ray.init(address=address, **kwargs)
        return
    cpus = max(os.cpu_count() or 1, min_cpus + 2)
    # the dashboard hosts the state API that Ray Train's controller polls; loopback only
    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    if quiet:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False


def storage_path(storage: str) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) unchanged."""
    if "://" in storage:
        return storage
    return os.path.abspath(os.path.expanduser(storage))
