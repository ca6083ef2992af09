"""Connecting to Ray: an embedded local Ray on a laptop, or the cluster at RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


# Set (unless --verbose) before Ray starts: the local raylet and so every Ray process inherits them,
# and `p5ray submit` passes them to a job's runtime_env.
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "ERROR",  # Ray Data's logs, e.g. "Progress bars disabled" in every worker
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # print() in workers is not re-logged (no duplicates)
    "RAY_DEDUP_LOGS": "1",
    # Ray installs a "show once per module" filter for its RayDeprecationWarnings unless Python
    # was given warning options; with these, Ray's processes ignore deprecation warnings
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    # Ray Tune's newer console output prints an experiment banner even at verbose=0; the older
    # engine prints nothing at verbose=0 (p5ray's ProgressCallback reports trials instead)
    "RAY_AIR_NEW_OUTPUT": "0",
}

# Ray Serve's request path, set before a local Ray starts (a `ray start` cluster needs them in the
# environment of its `ray start` commands: cluster.yaml, README "Serving"). Part of Serve's own
# throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED, whose direct ingress would open an HTTP port per
# ingress replica, and is left out): user code and the router on the replica's one event loop, not
# threads of their own; replica-to-replica calls over Serve's gRPC data plane; request-path logs
# buffered. Measured on /v1/recommend in BENCHMARKS.md ("Serving").
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def apply_serve_env() -> None:
    """SERVE_ENV into this process's environment (values already set win): a local Ray started
    afterwards passes them to every Serve process."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def verbose() -> bool:
    """--verbose sets P5RAY_VERBOSE=1: Ray's own INFO logs are then shown."""
    from p5ray.logs import verbose as is_verbose

    return is_verbose()


def train_logging_config():
    """Ray Train's LoggingConfig for RunConfig: warnings only unless --verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_train_worker() -> None:
    """In a Ray Train worker, without --verbose: Ray Train's INFO lines and Ray's own warnings off.

    Ray Train V2 logs "Reporting training result ..." at INFO on a logger named by its file path,
    outside `ray.train`, so LoggingConfig(log_level=...) does not reach it.
    """
    import warnings

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        pass
    else:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")


def prepare_driver() -> None:
    """Before a verb touches Ray: a RAY_ADDRESS with no cluster behind it fails now, in one line;
    Ray's forwarded output goes to stderr and its known noise is dropped (see p5ray/logs.py)."""
    from p5ray.logs import route_ray_output

    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
    route_ray_output()


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a RAY_ADDRESS that names no reachable Ray cluster (ClusterError, exit 2).

    ray.init() itself retries an unreachable address for minutes and then exits the process.
    """
    from p5ray.errors import ClusterError

    address = address.strip()
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard URL, but this verb joins the cluster itself",
            "set RAY_ADDRESS to the head's GCS address (HEAD:6379), or run the verb on the cluster "
            f"with `p5ray submit --address {address} -- VERB ...`",
        )
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"RAY_ADDRESS={address} is not HOST:PORT", "e.g. RAY_ADDRESS=10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster at RAY_ADDRESS={address} ({exc.strerror or exc})",
            "start one (`ray start --head`), point RAY_ADDRESS at its head (HEAD:6379), "
            "or unset RAY_ADDRESS to run on a local Ray",
        ) from None


def ensure_ray(min_cpus: int = 2) -> None:
    """Start (or join) Ray once per process.

    Locally, Ray gets at least `min_cpus + 2` logical CPUs so Ray Data tasks never starve while the
    training workers hold theirs (logical CPUs are bookkeeping; threads are set per worker).
    With RAY_ADDRESS set (a cluster, or inside a Ray Job) it connects there instead.
    Failing to start or join is a ClusterError (exit 2, one line).
    """
    import ray

    from p5ray.logs import quiet_ray_driver, route_ray_output

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    quiet = not verbose()
    level = "WARNING" if quiet else "INFO"
    if quiet:  # inherited by the local raylet and so by every Ray worker process
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    if address:
        check_address(address)
    route_ray_output()
    quiet_ray_driver()
    kwargs = {
        "logging_level": level,
        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level=level),
        "log_to_driver": True,
    }
    with _init_errors(address):
        if address:  # a cluster, or the cluster of the Ray Job this driver runs in
            ray.init(address=address, **kwargs)
        else:
            apply_serve_env()
            cpus = max(os.cpu_count() or 1, min_cpus + 2)
            # always a fresh local instance (address="local"): never someone else's `ray start`
            # cluster by accident; the dashboard hosts the state API that Ray Train's controller
            # polls, bound to loopback
            _init_local(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    quiet_ray_driver()  # ray.init configures Ray's loggers again
    if quiet:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False


def _init_local(attempts: int = 3, **kwargs) -> None:
    """ray.init for a local instance, retried: on a loaded machine the raylet can miss Ray's fixed
    start-up deadline ("node timed out during startup"), which a second try usually makes."""
    import ray

    from p5ray.errors import ClusterError

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception for a start-up timeout
            ray.shutdown()
            if "timed out" not in str(exc) or attempt == attempts:
                raise ClusterError(
                    f"a local Ray did not start: {str(exc).splitlines()[0]}",
                    "the machine may be short of CPU or memory; retry, or stop other Ray processes",
                ) from exc
            log.warning("local Ray start timed out (attempt %d of %d); retrying", attempt, attempts)


@contextlib.contextmanager
def _init_errors(address: str | None):
    """ray.init failures -> one-line ClusterError: no cluster, missing or wrong token, no local start."""
    from ray.exceptions import AuthenticationError

    from p5ray.errors import ClusterError

    try:
        yield
    except ClusterError:  # already one line (a local start that timed out every attempt)
        raise
    except AuthenticationError as exc:
        from p5ray.submit import find_token

        token, source = find_token()
        if token is None:
            raise ClusterError(
                f"the Ray cluster at {address} requires an auth token and none was found",
                "copy the cluster's token (`ray get-auth-token` on its head node) to ~/.ray/auth_token, "
                "or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH",
            ) from exc
        raise ClusterError(
            f"the Ray cluster at {address} rejected the auth token from {source}",
            "use that cluster's token: `ray get-auth-token` on its head node",
        ) from exc
    except (Exception, SystemExit) as exc:  # ray.init raises bare Exceptions, or exits the process
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if address:
            raise ClusterError(
                f"could not join the Ray cluster at {address}: {reason}",
                "check that the cluster is up and runs Ray 2.60, or unset RAY_ADDRESS to run on a local Ray",
            ) from exc
        raise ClusterError(
            f"could not start a local Ray: {reason}",
            "retry when the machine is less busy, or start one with `ray start --head` and set RAY_ADDRESS",
        ) from exc


@contextlib.contextmanager
def cluster_address_for_train():
    """Hand this cluster's address to Ray Train's controller (and so its PlacementGroupCleaner).

    The cleaner looks the cluster up through the state API without an address; with several Ray
    instances on one machine (a `p5ray serve` beside a `p5ray train`) that fails with a traceback
    and leaks the workers' CPUs when the controller dies. Ray Train copies RAY_ADDRESS to its
    controller when it is listed in ENV_VARS_TO_PROPAGATE and set while `fit()` starts.
    """
    import ray

    if os.environ.get("RAY_ADDRESS") or not ray.is_initialized():
        yield
        return
    from ray.train.v2._internal import constants

    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        yield
    finally:
        os.environ.pop("RAY_ADDRESS", None)


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
