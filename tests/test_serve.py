"""The real Serve applications on free loopback ports, called over real HTTP (httpx) and gRPC.

One module-scoped deployment: the combined app "p5ray" on checkpoint A (with ratings) and the
per-task app "rating" on a checkpoint without ratings. Tests run in file order: the bad-request
corpus, then a health check, then overload, then the hot swap (which leaves checkpoint B served).
"""

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from p5ray import server
from p5ray.inference import Recommender as Core
from p5ray.proto import p5ray_pb2 as pb
from p5ray.proto import p5ray_pb2_grpc
from p5ray.schemas import RecallRequest, RecommendRequest, from_proto
from tests.helpers import make_checkpoint, start_local_ray

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
COMBINED = (("application", "p5ray"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    config: dict
    http: httpx.Client
    url: str
    grpc_target: str
    checkpoint_a: Path
    checkpoint_b: Path

    def stub(self):
        return p5ray_pb2_grpc.RecommenderStub(grpc.insecure_channel(self.grpc_target))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    a = make_checkpoint(root / "a", model_version="model-a")
    b = make_checkpoint(root / "b", model_version="model-b", seed=1)
    no_ratings = make_checkpoint(root / "no-ratings", has_ratings=False, model_version="no-ratings")
    started = not ray.is_initialized()
    if started:
        start_local_ray()
    http_port, grpc_port = free_port(), free_port()
    config = server.serve_config(str(a), "127.0.0.1", http_port, grpc_port)
    apps = {app["name"]: app for app in config["applications"]}
    rating_app = apps["rating"]  # its own Rating replica, on a model trained without ratings
    rating_app["args"]["checkpoint"] = str(no_ratings)
    del rating_app["args"]["share_from"]
    # the combined app again, as an ingress over p5ray's task replicas running the composed pipeline
    composed = {"name": "composed", "route_prefix": "/composed", "import_path": server.BUILDER,
                "args": {"checkpoint": str(a), "share_from": "p5ray", "pipeline": "composed"}}
    config["applications"] = [apps["p5ray"], apps["recall"], rating_app, composed]  # recall: shares p5ray's
    server.start_serve(config)
    server.deploy(config, timeout_s=400)
    url = f"http://127.0.0.1:{http_port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield Served(config, client, url, f"127.0.0.1:{grpc_port}", a, b)
    serve.shutdown()
    if started:
        ray.shutdown()


def item_ids(items) -> list[str]:
    return [i["item_id"] if isinstance(i, dict) else i.item_id for i in items]


def grpc_error(call, request, metadata=COMBINED) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=metadata, timeout=60)
    return info.value.code(), info.value.details()


# -- pure: the wire formats (no Ray) -------------------------------------------------------------


def test_proto_requests_validate_like_http():
    assert from_proto(RecallRequest, pb.RecallRequest(user_id="u1")).k == 10  # unset k: default
    assert from_proto(RecallRequest, pb.RecallRequest()).user_id is None
    for k in (0, -3, 10**6):
        with pytest.raises(ValueError, match="k"):
            from_proto(RecommendRequest, pb.RecommendRequest(user_id="u1", k=k))
    with pytest.raises(ValueError, match="user_id"):
        from_proto(RecommendRequest, pb.RecommendRequest(k=3))


def test_config_file_deploys_the_apps_the_cli_deploys(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    file = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(file)
    cli = server.serve_config(file["applications"][0]["args"]["checkpoint"])
    shape = lambda c: [(a["name"], a["route_prefix"], a["import_path"], a["args"]) for a in c["applications"]]  # noqa: E731
    assert shape(file) == shape(cli)
    assert file["grpc_options"]["grpc_servicer_functions"] == cli["grpc_options"]["grpc_servicer_functions"]
    assert file["logging_config"] == cli["logging_config"] == {"enable_access_log": False}
    new = str(make_checkpoint(tmp_path / "new"))
    swapped = server.swap_checkpoint(file, new)
    assert shape(swapped) == shape(file)  # args untouched: a lightweight update, not a redeploy
    for app in swapped["applications"]:
        if app["args"].get("share_from"):  # a per-task ingress over the combined app's replicas
            assert not app.get("deployments") and app["args"]["share_from"] == "p5ray"
            continue
        configs = {d["name"]: d.get("user_config") for d in app["deployments"]}
        assert sum(c == {"checkpoint": new} for c in configs.values()) == 4


def test_serve_env_fills_what_is_unset_and_keeps_what_the_user_set(monkeypatch):
    import os

    from p5ray.raycluster import SERVE_ENV, apply_serve_env

    for key in SERVE_ENV:  # recorded, so the test leaves the environment as it found it
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    apply_serve_env()
    assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
    assert all(os.environ[k] == v for k, v in SERVE_ENV.items() if k != "RAY_SERVE_USE_GRPC_BY_DEFAULT")
    assert SERVE_ENV["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_load_bench_capacity_is_the_best_cell_within_the_p99_bound():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cell = lambda server, c, rps, p99, errors=0: {"server": server, "protocol": "http", "route": "recommend",  # noqa: E731
                                                 "concurrency": c, "rps": rps, "p99_ms": p99, "errors": errors}
    results = [cell("bare", 1, 100, 12), cell("bare", 4, 150, 49), cell("bare", 16, 160, 300),
               cell("serve", 1, 40, 30), cell("serve", 4, 130, 45, errors=1), cell("serve", 16, 200, 51),
               {**cell("serve", 4, 999, 1), "route": "rank"}]
    assert bench.capacity(results) == {"bare http": 150, "serve http": 40}


# -- happy paths ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_recommend_over_http_and_grpc_is_the_core_path(served):
    answer = served.http.post("/v1/recommend", json={"user_id": "u1", "k": 5}).json()
    assert len(answer["items"]) == 5 and len(answer["cross_sell"]) == 5
    assert answer["cold_start"] is False and answer["ignored"] == [] and answer["model_version"] == "model-a"
    want = Core(str(served.checkpoint_a)).recommend("u1", k=5)
    assert item_ids(answer["items"]) == [i for i, _ in want.items]
    assert item_ids(answer["cross_sell"]) == [i for i, _ in want.cross_sell]
    reply = served.stub().Recommend(pb.RecommendRequest(user_id="u1", k=5), metadata=COMBINED, timeout=60)
    assert item_ids(reply.items) == item_ids(answer["items"]) and reply.model_version == "model-a"


@pytest.mark.slow
def test_fused_and_composed_pipelines_give_the_same_answers(served):
    """/v1/recommend fused (one batched call to Recall) = composed (Recall, Rank, CrossSell in turn)."""
    bodies = [{"user_id": "u1", "k": 5}, {"user_id": "u7", "history": ["i3", "nope"], "k": 12},
              {"user_id": "stranger", "k": 3}, {"user_id": "newcomer", "history": ["i9"], "k": 1}]
    for body in bodies:
        fused = served.http.post("/v1/recommend", json=body)
        composed = served.http.post("/composed/v1/recommend", json=body)
        assert fused.status_code == composed.status_code == 200, (fused.text, composed.text)
        fused, composed = fused.json(), composed.json()
        assert item_ids(fused["items"]) == item_ids(composed["items"]) and len(fused["items"]) == body["k"]
        assert item_ids(fused["cross_sell"]) == item_ids(composed["cross_sell"])
        assert [fused[f] for f in ("cold_start", "ignored", "model_version")] == [composed[f] for f in ("cold_start", "ignored", "model_version")]
    reply = served.stub().Recommend(pb.RecommendRequest(user_id="u7", k=4), metadata=(("application", "composed"),), timeout=60)
    assert item_ids(reply.items) == item_ids(served.http.post("/v1/recommend", json={"user_id": "u7", "k": 4}).json()["items"])
    code, _ = grpc_error(served.stub().Recommend, pb.RecommendRequest(user_id="u7", k=0), (("application", "composed"),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_cold_start_and_unknown_history_items(served):
    cold = served.http.post("/v1/recommend", json={"user_id": "never-seen", "k": 3}).json()
    assert cold["cold_start"] is True and item_ids(cold["items"]) == ["i1", "i2", "i3"]
    reply = served.stub().Recommend(pb.RecommendRequest(user_id="never-seen", k=3), metadata=COMBINED, timeout=60)
    assert reply.cold_start and item_ids(reply.items) == ["i1", "i2", "i3"]
    warm = served.http.post("/v1/recommend", json={"user_id": "never-seen", "history": ["i7", "bogus"], "k": 3}).json()
    assert warm["cold_start"] is False and warm["ignored"] == ["bogus"] and "i7" not in item_ids(warm["items"])


@pytest.mark.slow
def test_every_task_route_and_rpc(served):
    stub = served.stub()
    recall = served.http.post("/v1/recall", json={"user_id": "u2", "k": 4}).json()
    assert len(recall["items"]) == 4 and recall["model_version"] == "model-a"
    assert item_ids(stub.Recall(pb.RecallRequest(user_id="u2", k=4), metadata=COMBINED).items) == item_ids(recall["items"])

    rank = served.http.post("/v1/rank", json={"user_id": "u2", "candidates": ["i9", "nope", "i3"]}).json()
    assert sorted(item_ids(rank["items"])) == ["i3", "i9"] and rank["ignored"] == ["nope"]
    reply = stub.Rank(pb.RankRequest(user_id="u2", candidates=["i9", "nope", "i3"]), metadata=COMBINED)
    assert item_ids(reply.items) == item_ids(rank["items"]) and list(reply.ignored) == ["nope"]

    cross = served.http.post("/v1/cross-sell", json={"item_ids": ["i5"], "k": 3}).json()
    assert len(cross["items"]) == 3 and "i5" not in item_ids(cross["items"])
    assert item_ids(stub.CrossSell(pb.CrossSellRequest(item_ids=["i5"], k=3), metadata=COMBINED).items) == item_ids(cross["items"])

    rating = served.http.post("/v1/rating", json={"user_id": "u2", "item_id": "i9"}).json()
    assert 1.0 <= rating["rating"] <= 5.0 and rating["model_version"] == "model-a"
    reply = stub.PredictRating(pb.RatingRequest(user_id="u2", item_id="i9"), metadata=COMBINED)
    assert reply.rating == pytest.approx(rating["rating"])


@pytest.mark.slow
def test_healthz_docs_and_unknown_route(served):
    health = served.http.get("/healthz")
    assert health.status_code == 200 and set(health.json()["model_version"]) == {"recall", "rank", "cross_sell", "rating"}
    assert served.http.get("/docs").status_code == 200
    paths = served.http.get("/openapi.json").json()["paths"]
    assert {"/v1/recommend", "/v1/recall", "/v1/rank", "/v1/cross-sell", "/v1/rating", "/healthz"} <= set(paths)
    missing = served.http.post("/v1/no-such-route", json={})
    assert missing.status_code == 404 and "detail" in missing.json()


@pytest.mark.slow
def test_rating_on_a_model_without_ratings_is_404_and_not_found(served):
    answer = served.http.post("/rating/v1/rating", json={"user_id": "u1", "item_id": "i3"})
    assert answer.status_code == 404 and "rating" in answer.json()["detail"]
    code, details = grpc_error(served.stub().PredictRating, pb.RatingRequest(user_id="u1", item_id="i3"), (("application", "rating"),))
    assert code == grpc.StatusCode.NOT_FOUND and "rating" in details


@pytest.mark.slow
def test_shared_per_task_app_answers_from_the_combined_apps_replica(served):
    own = served.http.post("/recall/v1/recall", json={"user_id": "u1", "k": 5})
    combined = served.http.post("/v1/recall", json={"user_id": "u1", "k": 5})
    assert own.status_code == 200 and own.json() == combined.json()
    assert served.http.post("/recall/v1/rank", json={"user_id": "u1", "candidates": ["i1"]}).status_code == 404
    reply = served.stub().Recall(pb.RecallRequest(user_id="u1", k=5), metadata=(("application", "recall"),), timeout=60)
    assert item_ids(reply.items) == item_ids(own.json()["items"])
    from ray import serve

    assert "Recall" not in serve.status().applications["recall"].deployments, "the model must load once"


@pytest.mark.slow
def test_per_task_app_serves_only_its_task(served):
    assert served.http.post("/rating/v1/recommend", json={"user_id": "u1"}).status_code == 404
    code, details = grpc_error(served.stub().Recall, pb.RecallRequest(user_id="u1"), (("application", "rating"),))
    assert code == grpc.StatusCode.NOT_FOUND and "p5ray" in details


# -- bad input: 422 / INVALID_ARGUMENT / 413, never 500 -------------------------------------------

BAD_HTTP = {
    "malformed JSON": ("/v1/recommend", b'{"user_id": "u1", "k": '),
    "not an object": ("/v1/recommend", b'["u1"]'),
    "empty body": ("/v1/recommend", b""),
    "user_id of wrong type": ("/v1/recommend", {"user_id": 7, "k": 3}),
    "k as string": ("/v1/recommend", {"user_id": "u1", "k": "10"}),
    "k of 0": ("/v1/recommend", {"user_id": "u1", "k": 0}),
    "negative k": ("/v1/recall", {"user_id": "u1", "k": -1}),
    "k of 10^6": ("/v1/recommend", {"user_id": "u1", "k": 10**6}),
    "history not a list": ("/v1/recommend", {"user_id": "u1", "history": "i1"}),
    "empty id in history": ("/v1/recall", {"history": ["i1", ""]}),
    "100,000-item history": ("/v1/recommend", {"user_id": "u1", "history": [f"i{n % 60 + 1}" for n in range(100_000)]}),
    "empty candidates": ("/v1/rank", {"user_id": "u1", "candidates": []}),
    "no item_ids": ("/v1/cross-sell", {"k": 3}),
    "unknown cross-sell items only": ("/v1/cross-sell", {"item_ids": ["zzz"], "k": 3}),
    "unknown rating item": ("/v1/rating", {"user_id": "u1", "item_id": "zzz"}),
    "id over 256 characters": ("/v1/recommend", {"user_id": "u" * 257}),
    "k as float": ("/v1/recommend", {"user_id": "u1", "k": 3.0}),
    "k as bool": ("/v1/recall", {"user_id": "u1", "k": True}),
    "k as null": ("/v1/recommend", {"user_id": "u1", "k": None}),
    "history of numbers": ("/v1/recommend", {"user_id": "u1", "history": [1, 2]}),
    "10,001 candidates": ("/v1/rank", {"candidates": ["i1"] * 10_001}),
    "k of 5,000 digits": ("/v1/recommend", b'{"user_id": "u1", "k": ' + b"9" * 5000 + b"}"),
    "JSON nested 100,000 deep": ("/v1/recommend", b"[" * 100_000),
    "invalid UTF-8": ("/v1/recommend", b'{"user_id": "\xff\xfe"}'),
    "NaN as k": ("/v1/recommend", b'{"user_id": "u1", "k": NaN}'),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_bad_http_request_is_422(served, case):
    route, body = BAD_HTTP[case]
    if isinstance(body, bytes):
        answer = served.http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        answer = served.http.post(route, json=body)
    assert answer.status_code == 422, answer.text[:300]
    assert answer.json()["detail"] and len(answer.content) < 10_000  # the input is not echoed


BAD_GRPC = {
    "k of 0": ("Recommend", pb.RecommendRequest(user_id="u1", k=0)),
    "negative k": ("Recall", pb.RecallRequest(user_id="u1", k=-1)),
    "k of 10^6": ("Recommend", pb.RecommendRequest(user_id="u1", k=10**6)),
    "no user_id": ("Recommend", pb.RecommendRequest(k=3)),
    "100,000-item history": ("Recommend", pb.RecommendRequest(user_id="u1", history=[f"i{n % 60 + 1}" for n in range(100_000)])),
    "empty candidates": ("Rank", pb.RankRequest(user_id="u1")),
    "no item_ids": ("CrossSell", pb.CrossSellRequest(k=2)),
    "unknown rating item": ("PredictRating", pb.RatingRequest(user_id="u1", item_id="zzz")),
    "id over 256 characters": ("Recall", pb.RecallRequest(user_id="u" * 257)),
    "empty id in history": ("Recommend", pb.RecommendRequest(user_id="u1", history=["i1", ""])),
    "10,001 candidates": ("Rank", pb.RankRequest(candidates=["i1"] * 10_001)),
    "no item_id": ("PredictRating", pb.RatingRequest(user_id="u1")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_GRPC))
def test_bad_grpc_request_is_invalid_argument(served, case):
    method, request = BAD_GRPC[case]
    code, details = grpc_error(getattr(served.stub(), method), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details


@pytest.mark.slow
def test_body_over_limit_is_413(served):
    big = b'{"user_id": "u1", "history": ["' + b"x" * (10 * 1024 * 1024) + b'"]}'
    answer = served.http.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    chunks = (b"x" * 65536 for _ in range(64))  # 4 MB without Content-Length (chunked)
    answer = served.http.post("/v1/recommend", content=chunks, headers={"content-type": "application/json"})
    assert answer.status_code == 413


@pytest.mark.slow
def test_fuzz_over_the_openapi_schema_finds_no_500(served):
    """schemathesis: generated bodies (valid and not) for every operation; no answer is a 5xx."""
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            case.call_and_validate(base_url=served.url, checks=[not_a_server_error])

        call()


@pytest.mark.slow
def test_still_healthy_after_bad_requests(served):
    from ray import serve

    assert served.http.get("/healthz").status_code == 200
    statuses = serve.status().applications
    assert {statuses[a["name"]].status for a in served.config["applications"]} == {"RUNNING"}
    assert served.http.post("/v1/recommend", json={"user_id": "u3", "k": 2}).status_code == 200


def _access_lines() -> int:
    """Serve access-log lines ("POST /v1/recommend 200 3.1ms") in the stderr files of every
    Ray worker of this session: where the proxy's and the replicas' per-request lines go."""
    import re

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    line = re.compile(r"\b(GET|POST) /\S* \d{3} [\d.]+ms")
    return sum(len(line.findall(f.read_text(errors="replace"))) for f in logs.glob("worker-*.err"))


def test_requests_write_no_access_log_lines(served):
    """Access logs are off (server.LOGGING): a request costs no log write on the proxy or replica."""
    before = _access_lines()
    for user in ("u1", "u2", "u3", "u4", "u5"):
        assert served.http.post("/v1/recommend", json={"user_id": user, "k": 2}).status_code == 200
    time.sleep(2)
    assert _access_lines() == before


# -- load: overload and hot swap ------------------------------------------------------------------


async def _burst(url: str, target: str, n: int) -> tuple[list[int], list[grpc.StatusCode]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client, grpc.aio.insecure_channel(target) as channel:
        stub = p5ray_pb2_grpc.RecommenderStub(channel)

        async def over_grpc():
            try:
                await stub.Recommend(pb.RecommendRequest(user_id="u1", k=50), metadata=COMBINED, timeout=60)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        http = [client.post("/v1/recommend", json={"user_id": "u1", "k": 50}) for _ in range(n)]
        answers = await asyncio.gather(*http, *(over_grpc() for _ in range(n)))
    return [a.status_code for a in answers[:n]], list(answers[n:])


@pytest.mark.slow
def test_overload_is_503_and_unavailable_never_500(served):
    tight = server.swap_checkpoint(served.config, str(served.checkpoint_a))
    for deployment in tight["applications"][0]["deployments"]:
        if deployment["name"] == "Recall":
            deployment.update(max_ongoing_requests=1, max_queued_requests=1)
    server.deploy(tight, timeout_s=120)
    try:
        http, rpc = asyncio.run(_burst(served.url, served.grpc_target, 40))
    finally:
        server.deploy(served.config, timeout_s=120)
    assert set(http) <= {200, 503} and 503 in http and 200 in http
    assert set(rpc) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE} and grpc.StatusCode.UNAVAILABLE in rpc


def replica_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}


@pytest.mark.slow
def test_hot_swap_under_concurrent_requests_fails_none(served):
    stop = threading.Event()
    versions, failures = [], []

    def client(n: int):
        stub = served.stub()
        with httpx.Client(base_url=served.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    if n % 2:
                        reply = stub.Recall(pb.RecallRequest(user_id="u1", k=5), metadata=COMBINED, timeout=60)
                        versions.append(reply.model_version)
                    else:
                        answer = http.post("/v1/recommend", json={"user_id": f"u{n + 1}", "k": 5})
                        answer.raise_for_status()
                        versions.append(answer.json()["model_version"])
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(exc))

    replicas_before = replica_actors()
    assert len(replicas_before) == 9  # p5ray: ingress + 4 tasks; recall, composed: ingress; rating: ingress + Rating
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        server.deploy(server.swap_checkpoint(served.config, str(served.checkpoint_b)), timeout_s=300)
        deadline = time.monotonic() + 120
        while set(served.http.get("/healthz").json()["model_version"].values()) != {"model-b"}:
            assert time.monotonic() < deadline, "weights were not swapped"
            time.sleep(0.5)
        seen = len(versions)
        while len(versions) < seen + 20:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert replica_actors() == replicas_before  # reconfigured in place: no replica restarted
    assert versions[0] == "model-a" and versions[-1] == "model-b" and set(versions) == {"model-a", "model-b"}
