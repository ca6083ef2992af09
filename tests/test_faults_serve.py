"""Serving under real faults, on one deployment of the combined app (loopback, free ports):

    a 10-second soak (zero errors, RSS of every serving process at both ends);
    many requests cancelled by tiny client timeouts, then normal requests (the batch queue);
    a Recall replica SIGKILLed under a fixed-rate load (the answers during and after recovery);
    a Recall replica whose request path hangs (health check -> replaced).

Task deployments run 2 replicas. Recall's health check is tightened for the test (period 1 s,
timeout 5 s, stall_timeout_s 10 s, graceful shutdown 2 s) and its replicas carry the test-only
stall hook of p5ray/faults.py, inert until the test creates the trigger file.
"""

import asyncio
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from p5ray import server
from p5ray.proto import p5ray_pb2 as pb
from p5ray.proto import p5ray_pb2_grpc
from tests.helpers import ROOT, make_checkpoint, start_local_ray
from tests.helpers_faults import kill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
COMBINED = (("application", "p5ray"),)
RECALL = {"health_check_period_s": 1, "health_check_timeout_s": 5, "graceful_shutdown_timeout_s": 2,
          "graceful_shutdown_wait_loop_s": 1}
STALL_TIMEOUT_S = 10


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    config: dict
    url: str
    grpc_target: str
    http_port: int
    fault_dir: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("faults-serve")
    checkpoint = make_checkpoint(root / "ckpt", model_version="sturdy")
    fault_dir = root / "faults"
    fault_dir.mkdir()
    started = not ray.is_initialized()
    if started:
        start_local_ray()
    http_port, grpc_port = free_port(), free_port()
    config = server.serve_config(str(checkpoint), "127.0.0.1", http_port, grpc_port, replicas=2)
    app = config["applications"][0]  # the combined app: every route
    app["args"].update(replica_cpus=0.25, stall_timeout_s=STALL_TIMEOUT_S)
    env = {"P5RAY_FAULT": "stall deployment=Recall", "P5RAY_FAULT_DIR": str(fault_dir)}
    app["deployments"] = [{"name": "Recall", **RECALL,
                           "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}}}]
    config["applications"] = [app]
    server.start_serve(config)
    server.deploy(config, timeout_s=600)
    url = f"http://127.0.0.1:{http_port}"
    server.wait_healthy(url, 300, __import__("threading").Event())
    yield Served(config, url, f"127.0.0.1:{grpc_port}", http_port, fault_dir)
    serve.shutdown()
    if started:
        ray.shutdown()


def recall_replicas() -> dict[int, str]:
    """pid -> state of every Recall replica actor (ALIVE, or being started)."""
    from ray._private.state import actors

    return {a["Pid"]: a["State"] for a in actors().values()
            if a["ActorClassName"] == "ServeReplica:p5ray:Recall" and a["State"] != "DEAD"}


def running_recall_replicas() -> int:
    from ray import serve

    states = serve.status().applications["p5ray"].deployments["Recall"].replica_states
    return states.get("RUNNING", 0)


def replaced(before: dict[int, str], gone: int) -> bool:
    """`gone` is dead, a new Recall replica is alive in its place and Serve runs two again."""
    now = recall_replicas()
    fresh = [pid for pid, state in now.items() if pid not in before and state == "ALIVE"]
    return gone not in now and bool(fresh) and running_recall_replicas() == 2


def ingress_retries() -> int:
    """How many times the ingress retried a task call (serve.call_task's warnings in its logs)."""
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_logs_dir_path())  # the p5ray logger of a replica writes to its worker's stderr
    return sum(f.read_text(errors="replace").count("retrying on another") for f in logs.glob("worker-*.err"))


def print_outcome(name: str, answers, event_s: float | None = None, recovered_s: float | None = None) -> None:
    failed = [a for a in answers if not a.ok]
    line = f"\n{name}: {len(answers)} requests, {len(failed)} failed"
    if event_s is not None:
        line += f"; fault at {event_s:.1f} s"
    if recovered_s is not None:
        line += f", recovered at {recovered_s:.1f} s"
    print(line + "".join(f"\n  failed at {a.sent_s:.1f} s: {a.status} {a.error[:120]}" for a in failed[:10]))


# -- limits and load -------------------------------------------------------------------------------


def test_http_listens_on_loopback_only(served):
    assert served.config["http_options"]["host"] == "127.0.0.1"
    assert server.serve_config("c")["http_options"]["host"] == "127.0.0.1"
    import ray

    outside = ray.util.get_node_ip_address()  # the address other machines reach this one by
    if outside.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outside, served.http_port), timeout=5).close()
    socket.create_connection(("127.0.0.1", served.http_port), timeout=5).close()


def test_soak_ten_seconds_zero_errors_and_memory(served):
    report = soak.soak(served.url, rate=8, duration_s=10, pids=soak.serve_actor_pids, warmup_s=3, readings=2)
    print(f"\nsoak 10 s at 8/s: {report['requests']} requests, {report['errors']} errors, p50 {report['p50_ms']} ms, "
          f"p99 {report['p99_ms']} ms; serving RSS {report['serving_rss_mb'][0]} -> {report['serving_rss_mb'][-1]} MB")
    assert report["errors"] == 0, report["errors_by_kind"]
    assert report["requests"] == 80 and not report["processes_gone"]
    assert len(report["memory"]) >= 10  # controller, proxy, ingress x2, 4 tasks x 2 replicas
    for process in report["memory"]:  # a 10 s run shows no trend; it catches a runaway leak
        assert process["growth_mb"] < 100, process


# -- cancelled requests and the batch queue --------------------------------------------------------


async def _abandon(url: str, target: str, n: int) -> int:
    """n HTTP and n gRPC requests whose clients give up after a few milliseconds."""
    gave_up = 0
    async with httpx.AsyncClient(base_url=url) as client, grpc.aio.insecure_channel(target) as channel:
        stub = p5ray_pb2_grpc.RecommenderStub(channel)

        async def over_http(i: int):
            nonlocal gave_up
            try:
                await client.post("/v1/recall", json={"user_id": f"u{i % 20 + 1}", "k": 50}, timeout=0.005 * (1 + i % 5))
            except httpx.TimeoutException:
                gave_up += 1

        async def over_grpc(i: int):
            nonlocal gave_up
            try:
                await stub.Recommend(pb.RecommendRequest(user_id=f"u{i % 20 + 1}", k=50), metadata=COMBINED,
                                     timeout=0.005 * (1 + i % 5))
            except grpc.aio.AioRpcError as exc:
                gave_up += exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        await asyncio.gather(*(over_http(i) for i in range(n)), *(over_grpc(i) for i in range(n)))
    return gave_up


def test_cancelled_requests_never_wedge_the_batch_queue(served):
    replicas = recall_replicas()
    gave_up = asyncio.run(_abandon(served.url, served.grpc_target, 100))
    assert gave_up >= 100, f"only {gave_up} of 200 clients timed out: the test did not cancel anything"
    start = time.monotonic()
    answers = asyncio.run(soak.open_loop(served.url, rate=10, duration_s=3, route="/v1/recall",
                                         make_body=lambda i: {"user_id": f"u{i % 20 + 1}", "k": 5}, timeout_s=20))
    elapsed = time.monotonic() - start
    print_outcome(f"after {gave_up} abandoned requests, normal recall (took {elapsed:.1f} s)", answers)
    assert all(a.ok for a in answers) and max(a.latency_s for a in answers) < 10
    time.sleep(STALL_TIMEOUT_S + 3)  # cancelled requests left no phantom in-flight request:
    assert recall_replicas() == replicas  # no replica failed its stall health check and was replaced
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200


# -- a replica killed under load -------------------------------------------------------------------


def test_replica_killed_under_load_keeps_answering(served):
    """SIGKILL one of the two Recall replicas 5 s into a 20 s load at 8 requests/s."""
    before = recall_replicas()
    assert len(before) == 2 and set(before.values()) == {"ALIVE"}
    victim = min(before)
    events: dict[str, float] = {}

    async def load_and_kill():
        start = time.perf_counter()
        load = asyncio.create_task(soak.open_loop(served.url, rate=8, duration_s=20, timeout_s=30))
        await asyncio.sleep(5)
        events["killed"] = time.perf_counter() - start
        kill(victim)
        while not replaced(before, victim):
            await asyncio.sleep(0.25)
        events["recovered"] = time.perf_counter() - start
        return await load

    retried = ingress_retries()
    answers = asyncio.run(load_and_kill())
    print_outcome("replica kill", answers, events["killed"], events.get("recovered"))
    print(f"  requests the ingress retried on the other replica: {ingress_retries() - retried}")
    after = recall_replicas()
    assert victim not in after and len(after) == 2
    failed_after_recovery = [a for a in answers if not a.ok and a.sent_s > events["recovered"]]
    assert failed_after_recovery == []
    failed = [a for a in answers if not a.ok]
    assert all(a.status == 503 for a in failed), failed  # never a 500: a retryable 503 at worst
    assert len(answers) == 160


# -- a replica whose request path hangs ------------------------------------------------------------


def test_stalled_replica_is_detected_and_replaced(served):
    before = recall_replicas()
    assert len(before) == 2
    (served.fault_dir / "stall").write_text("")  # the next Recall batch claims it and hangs
    events: dict[str, float] = {}

    async def load_until_replaced():
        start, stop = time.perf_counter(), asyncio.Event()
        load = asyncio.create_task(soak.open_loop(served.url, rate=5, duration_s=150, timeout_s=60, stop=stop))
        while not list(served.fault_dir.glob("stalled-*")):
            assert time.perf_counter() - start < 30, "no replica picked up the stall"
            await asyncio.sleep(0.1)
        events["stalled"] = time.perf_counter() - start
        stalled_pid = int(next(served.fault_dir.glob("stalled-*")).name.split("-")[1])
        events["pid"] = stalled_pid
        while not replaced(before, stalled_pid):
            assert time.perf_counter() - start < 120, "the stalled replica was not replaced"
            await asyncio.sleep(0.25)
        events["replaced"] = time.perf_counter() - start
        await asyncio.sleep(5)  # and answers after the replacement
        stop.set()
        return await load

    retried = ingress_retries()
    answers = asyncio.run(load_until_replaced())
    print_outcome("stalled replica", answers, events["stalled"], events["replaced"])
    print(f"  detected and replaced {events['replaced'] - events['stalled']:.1f} s after the stall "
          f"(stall_timeout_s {STALL_TIMEOUT_S}, health check every {RECALL['health_check_period_s']} s); "
          f"requests the ingress retried on the other replica: {ingress_retries() - retried}")
    assert events["pid"] in before and events["pid"] not in recall_replicas()
    assert [a for a in answers if not a.ok and a.sent_s > events["replaced"]] == []
    assert all(a.status in (200, 503) for a in answers)
    assert os.path.exists(served.fault_dir / f"stalled-{events['pid']}")
