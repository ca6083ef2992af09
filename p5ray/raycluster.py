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
    if address:  # a cluster, or the cluster of the Ray Job this driver runs in
        ray.init(address=address, **kwargs)
    else:
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


# -- beyond one machine -----------------------------------------------------------------------


def cluster_capacity() -> dict[str, float]:
    """CPUs and GPUs of the connected cluster: what an autoscaler can grow it to, else what it has."""
    import ray
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config()  # None without an autoscaler
    except Exception:  # an older GCS without the autoscaler config: plan on what is there
        most = None
    have = ray.cluster_resources()
    source = most or have
    return {"CPU": float(source.get("CPU", 0.0)), "GPU": float(source.get("GPU", 0.0))}


def worker_plan(num_workers: int, cpus_per_worker: float, use_gpu: bool):
    """hardware.plan_workers for the connected cluster; refuses --use-gpu without enough GPUs."""
    from p5ray.errors import ClusterError
    from p5ray.hardware import check_gpus, plan_workers

    capacity = cluster_capacity()
    problem = check_gpus(num_workers, use_gpu, capacity["GPU"])
    if problem:
        raise ClusterError(problem, "lower --num-workers, or add GPU nodes to the cluster")
    plan = plan_workers(num_workers, cpus_per_worker, use_gpu, capacity["CPU"])
    if plan.note:
        log.warning("%s", plan.note)
    return plan


def alive_nodes() -> list[dict]:
    """Alive Ray nodes as {"id", "address"}."""
    import ray

    return [
        {"id": n["NodeID"], "address": n.get("NodeManagerAddress", "?")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def needs_storage_check(storage: str, num_nodes: int) -> bool:
    """A local path on a multi-node cluster must be checked; URIs (s3://, gs://, ...) are shared."""
    return "://" not in storage and num_nodes > 1


def storage_refusal(storage: str, blind: list[dict], num_nodes: int) -> str | None:
    """The one-line refusal for nodes that cannot see `storage`, or None when every node can."""
    if not blind:
        return None
    names = ", ".join(f"{n['address']} (node {n['id'][:8]})" for n in blind)
    return (
        f"--storage {storage} is not visible from {len(blind)} of {num_nodes} nodes: {names}; "
        "checkpoints written there would be lost"
    )


STORAGE_HINT = (
    "use a directory every node mounts at the same path (NFS, a shared volume) "
    "or a URI such as s3://bucket/runs or gs://bucket/runs"
)


def check_shared_storage(storage: str, timeout_s: float = 120.0) -> None:
    """Refuse a local --storage path that some node of a multi-node cluster cannot see.

    The driver writes a marker file under `storage`; a zero-CPU task pinned to each alive node
    (NodeAffinitySchedulingStrategy, hard) reads it back. Nodes the autoscaler adds later are not
    checked: give autoscaling clusters a shared mount in their node setup, or a URI.
    """
    import uuid

    from p5ray.errors import ClusterError

    nodes = alive_nodes()
    if not needs_storage_check(storage, len(nodes)):
        return
    os.makedirs(storage, exist_ok=True)
    token = uuid.uuid4().hex
    marker = os.path.join(storage, f".p5ray-storage-check-{token}")
    with open(marker, "w") as f:
        f.write(token)
    try:
        blind = nodes_not_seeing(marker, token, nodes, timeout_s)
    finally:
        os.remove(marker)
    message = storage_refusal(storage, blind, len(nodes))
    if message:
        raise ClusterError(message, STORAGE_HINT)
    log.info("storage %s is visible from all %d nodes", storage, len(nodes))


def nodes_not_seeing(path: str, content: str, nodes: list[dict], timeout_s: float = 120.0) -> list[dict]:
    """The nodes on which a task cannot read `content` from the file `path`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(read_marker)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(path)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    blind = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            seen = ray.get(ref) if ref in done else None
        except Exception:  # the node died or could not run the task: it cannot hold checkpoints
            seen = None
        if seen != content:
            blind.append(node)
    return blind


def read_marker(path: str, patience_s: float = 5.0) -> str | None:
    """The file's text, or None if it does not appear within `patience_s` (NFS caches lag)."""
    import time

    deadline = time.monotonic() + patience_s
    while True:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)
