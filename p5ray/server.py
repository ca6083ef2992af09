"""`p5ray serve` and `p5ray recommend`: run the applications of serve.py, and a small client.

    serve_config(...)      the Serve config (the shape of serve/config.yaml) as a dict
    swap_checkpoint(...)   the same config with every task's user_config on a new checkpoint
    deploy(config)         apply a config to the running Serve, as `serve deploy` does; wait
    run(...)               the `serve` verb: check, start, wait healthy, print, block, shut down
    recommend(...)         the `recommend` verb: one HTTP request, printed as a table or JSON
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from p5ray import checkpoint as ckpt
from p5ray.errors import ClusterError, InvalidRequestError, P5RayError, UserError
from p5ray.tasks import TASKS

log = logging.getLogger(__name__)

SERVICER = "p5ray.proto.p5ray_pb2_grpc.add_RecommenderServicer_to_server"
BUILDER = "p5ray.serve:build_app"
# (application, HTTP route prefix, tasks): the combined app and one app per task
APPS = (("p5ray", "/", None),) + tuple((t.name, f"/{t.route}", [t.name]) for t in TASKS)


# Serve's per-request access log lines, off: each one is a write to the process's stderr that
# Ray's log monitor then reads and publishes, a per-request cost on every proxy and replica
# (BENCHMARKS.md, "Serving"). Warnings and errors are still logged, to the terminal and to
# Serve's log files; set enable_access_log: true in a Serve config to get the lines back.
LOGGING = {"enable_access_log": False}


def serve_config(checkpoint: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
                 replicas: int | None = None, use_gpu: bool = False) -> dict:
    apps = []
    for name, prefix, tasks in APPS:
        args = {"checkpoint": os.path.abspath(checkpoint)}
        if tasks:  # a per-task app: its own ingress over the combined app's task deployments
            args["tasks"] = tasks
            args["share_from"] = "p5ray"
        else:
            args["pipeline"] = "fused"  # /v1/recommend in one batched call (serve.py: AppArgs.pipeline)
            if replicas:
                args["replicas"] = replicas
            if use_gpu:  # the four task replicas of a set share one GPU
                args["replica_gpus"] = 1 / len(TASKS)
        apps.append({"name": name, "route_prefix": prefix, "import_path": BUILDER, "args": args})
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "logging_config": dict(LOGGING),  # Serve's own components, and every app that sets none
        "applications": apps,
    }


def check_gpus(needed: float, have: float) -> None:
    """--use-gpu where there are too few GPUs: one line, before anything is deployed.

    `needed` is the GPUs of one set of task replicas per replica (the four tasks share one),
    `have` what the Ray cluster (or, before a local Ray starts, this machine) offers.
    """
    if have < needed:
        raise UserError(f"--use-gpu: {'the Ray cluster has' if os.environ.get('RAY_ADDRESS') else 'this machine has'} "
                        f"{have:g} GPU(s), the task replicas need {needed:g}",
                        "serve on CPU (drop --use-gpu), or join a cluster with GPUs via RAY_ADDRESS")


def swap_checkpoint(config: dict, checkpoint: str) -> dict:
    """`config` with every task deployment's user_config pointing at `checkpoint`.

    Deployed, only user_config differs, so Serve reconfigures the running replicas in place:
    each loads the new weights beside the old ones and swaps, with no request failed.
    """
    from p5ray.serve import TASK_DEPLOYMENTS

    ckpt.read_meta(checkpoint)
    new = copy.deepcopy(config)
    for app in new["applications"]:
        if app["args"].get("share_from"):
            continue  # no task deployments of its own: it follows the application it shares
        overrides = {d["name"]: d for d in app.get("deployments", [])}
        for task in app["args"].get("tasks") or list(TASK_DEPLOYMENTS):
            name = TASK_DEPLOYMENTS[task].name
            overrides.setdefault(name, {"name": name})["user_config"] = {"checkpoint": os.path.abspath(checkpoint)}
        app["deployments"] = list(overrides.values())
    return new


def start_serve(config: dict) -> None:
    from ray import serve

    serve.start(proxy_location=config.get("proxy_location", "HeadOnly"),
                http_options=config["http_options"], grpc_options=config["grpc_options"],
                logging_config=config.get("logging_config"))


def deploy(config: dict, timeout_s: float = 600, stop: threading.Event | None = None) -> None:
    """Apply the applications of `config` to the running Serve and wait until all run."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    wait_running([a["name"] for a in config["applications"]], timeout_s, stop)


def wait_running(names: list[str], timeout_s: float, stop: threading.Event | None = None) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: (apps[n].status if n in apps else "NOT_STARTED") for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            reason = (apps[failed[0]].message or "").strip().splitlines()
            raise P5RayError(f"application {failed[0]} failed to deploy: {reason[-1] if reason else states}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            raise P5RayError(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def check_port_free(host: str, port: int, flag: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ClusterError(f"port {port} on {host} is in use ({exc.strerror})", f"stop what holds it or pass another {flag}") from None


def wait_healthy(url: str, timeout_s: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise P5RayError(f"{url}/healthz not healthy after {timeout_s:.0f} s")
        time.sleep(0.5)


def run(checkpoint: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
        replicas: int | None = None, timeout_s: float = 600, use_gpu: bool = False) -> int:
    """Start Ray (or join RAY_ADDRESS) and Serve, print the two addresses, block until SIGINT/SIGTERM."""
    meta = ckpt.read_meta(checkpoint)
    ckpt.verify(checkpoint, meta)
    if http_port == grpc_port:
        raise UserError(f"--http-port and --grpc-port are both {http_port}", "pass two different ports")
    check_port_free(host, http_port, "--http-port")
    check_port_free("0.0.0.0", grpc_port, "--grpc-port")  # Serve's gRPC proxy binds every interface
    if use_gpu and not os.environ.get("RAY_ADDRESS"):  # a local Ray: the GPUs are this machine's
        import torch

        check_gpus(replicas or 1, torch.cuda.device_count())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    import ray
    from ray import serve

    from p5ray.raycluster import ensure_ray

    config = serve_config(checkpoint, host, http_port, grpc_port, replicas, use_gpu)
    ensure_ray(min_cpus=math.ceil(0.5 * 2 * len(TASKS) * (replicas or 1)))  # 0.5 CPU per task replica
    try:
        if use_gpu:
            check_gpus(replicas or 1, ray.cluster_resources().get("GPU", 0))
        start_serve(config)
        deploy(config, timeout_s, stop)
        http_url = f"http://{host}:{http_port}"
        wait_healthy(http_url, timeout_s, stop)
        if not stop.is_set():
            print(f"http: {http_url}", flush=True)
            print(f"grpc: {host}:{grpc_port}", flush=True)
            log.info("serving model %s; Ctrl-C to stop", meta.get("model_version"))
        while not stop.wait(0.5):
            pass
        log.info("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


# -- the client ---------------------------------------------------------------------------------


def post(url: str, body: dict, timeout_s: float = 30) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["detail"]
        except (ValueError, KeyError, TypeError):
            pass
        raise InvalidRequestError(f"{url} answered {exc.code}: {json.dumps(detail) if not isinstance(detail, str) else detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClusterError(f"no p5ray server at {url} ({reason})", "start one with `p5ray serve --checkpoint DIR` or pass --url") from None


def recommend(user: str, k: int = 10, url: str = "http://127.0.0.1:8000", history: list[str] | None = None,
              raw: bool = False) -> int:
    body = {"user_id": user, "k": k}
    if history:
        body["history"] = history
    answer = post(f"{url.rstrip('/')}/v1/recommend", body)
    if raw:
        print(json.dumps(answer))
        return 0
    print(format_table(answer, user))
    return 0


def format_table(answer: dict, user: str) -> str:
    flags = " (cold start: popular items)" if answer.get("cold_start") else ""
    lines = [f"user {user}{flags}, model {answer.get('model_version')}", f"{'rank':>4}  {'item_id':<24} {'score':>10}"]
    lines += [f"{n:>4}  {i['item_id']:<24} {i['score']:>10.4f}" for n, i in enumerate(answer.get("items", []), 1)]
    if answer.get("cross_sell"):
        lines.append("cross-sell: " + ", ".join(i["item_id"] for i in answer["cross_sell"]))
    if answer.get("ignored"):
        lines.append("ignored (unknown ids): " + ", ".join(answer["ignored"]))
    return "\n".join(lines)
