"""What reaches the terminal: p5ray's log formats, Ray's noise filtered, Ray connection errors (no Ray)."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from p5ray import logs, raycluster
from p5ray.errors import ClusterError


@pytest.fixture(autouse=True)
def restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    logs.setup()


def test_json_lines_parse_and_carry_fields(capsys):
    logs.setup(fmt="json")
    logging.getLogger("p5ray.prepare").info("read %d rows", 7, extra={"fields": {"rows": 7}})
    logging.getLogger("p5ray.train").warning("careful")
    records = [json.loads(ln) for ln in capsys.readouterr().err.strip().splitlines()]
    assert records[0]["message"] == "read 7 rows" and records[0]["rows"] == 7 and records[0]["level"] == "INFO"
    assert records[1]["logger"] == "p5ray.train" and records[1]["level"] == "WARNING"


def test_quiet_keeps_warnings_only_and_verbose_is_remembered_for_ray(capsys):
    logs.setup(quiet=True)
    logging.getLogger("p5ray.x").info("hidden")
    logging.getLogger("p5ray.x").warning("shown")
    assert capsys.readouterr().err.count("\n") == 1
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "ERROR"  # inherited by the Ray processes started next
    logs.setup(verbose=True)
    assert logs.verbose() and raycluster.verbose()


def forwarded(lines, **data):
    return {"lines": lines, "pid": 1234, "is_err": True, **data}


def test_forwarded_noise_is_dropped_the_rest_goes_to_stderr(capsys):
    logs.setup()
    logs.log_forwarded(forwarded([
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'x': 1}) from rank 1",
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "[2026-12-03 19:29:47,266 E 19448 19540] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'f4f5' has constructor arguments in the object store and max_restarts > 0.",
        "[2026-12-04 07:33:48,265 E 29294 29332] core_worker.cc:4621: Mismatched ActorID: ignoring KillActor for "
        "previous actor 19e7cfc6, current actor ID: NIL_ID",
        "2026-12-04 07:42:39,297\tWARNING placement_group_cleaner.py:120 -- Detected that the Ray Train controller "
        "actor (16b7a6e2a4f9) is dead. Cleaning up placement group = [PlacementGroupID(afaca8a7)] created by this run.",
        "RuntimeError: something real broke",
    ], actor_name="RayTrainWorker"))
    logs.log_forwarded(forwarded([
        "INFO 2026-12-04 07:21:02,474 controller 12983 -- Removing 1 replica from Deployment(name='Rank', app='p5ray').",
        "INFO 2026-12-04 07:21:00,100 p5ray_Recommender mizkkhvb b509 -- CALL p5ray OK 39.1ms",
    ], actor_name="ServeController"))
    logs.log_forwarded({"lines": ["Task ServeController.graceful_shutdown failed. There are infinite retries remaining, "
                                  "so the task will be retried. Error: The actor is dead because it was killed by "
                                  "`ray.kill`."], "pid": "raylet", "is_err": False})
    logs.log_forwarded({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: 9f14 with address: "
                                  "192.0.2.2, which is 4x the maximum expected startup concurrency (2)."],
                        "pid": "raylet", "is_err": False})
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert "(RayTrainWorker) RuntimeError: something real broke" in line and "WARNING p5ray.ray" in line


def test_the_wrapped_ray_printer_never_writes_stdout(capsys):
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    try:
        logs.route_ray_output()
        wrapped = ray_worker.print_to_stdstream
        logs.route_ray_output()  # once only
        assert wrapped.p5ray_wrapped and ray_worker.print_to_stdstream is wrapped
        logs.setup()
        ray_worker.print_to_stdstream({"lines": ["a raylet warning"], "pid": "raylet", "is_err": False}, False)
        logs.setup(verbose=True)  # Ray's own printer, but on stderr
        ray_worker.print_to_stdstream({"lines": ["another raylet warning"], "pid": "raylet", "is_err": False}, False)
        out, err = capsys.readouterr()
        assert out == "" and "a raylet warning" in err and "another raylet warning" in err
    finally:
        ray_worker.print_to_stdstream = original


def test_rays_token_notice_is_dropped_other_records_of_that_logger_kept(capsys):
    name = "ray._private.authentication.authentication_token_setup"
    logger = logging.getLogger(name)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logs.quiet_ray_driver()
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        assert [r.getMessage()[:33] for r in records] == ["Token authentication is disabled "]
    finally:
        logger.removeHandler(handler)


def test_train_worker_quiet_reaches_the_logger_named_by_a_file_path():
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.NOTSET)
    raycluster.quiet_train_worker()
    assert logging.getLogger(context.__file__).getEffectiveLevel() == logging.WARNING
    assert not logging.getLogger(context.__file__).isEnabledFor(logging.INFO)


# -- RAY_ADDRESS and ray.init failures ------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, fragment", [
    ("127.0.0.1:{port}", "no Ray cluster at RAY_ADDRESS=127.0.0.1:{port}"),
    ("http://127.0.0.1:8265", "is a dashboard URL"),
    ("headnode", "is not HOST:PORT"),
])
def test_ray_address_with_nothing_behind_it_fails_fast(address, fragment):
    port = closed_port()
    with pytest.raises(ClusterError) as info:
        raycluster.check_address(address.format(port=port), timeout_s=2)
    assert fragment.format(port=port) in info.value.one_line()


def test_ray_address_auto_and_client_urls_are_left_to_ray():
    raycluster.check_address("auto")
    raycluster.check_address("ray://head:10001")


@pytest.mark.parametrize("token_env, fragment", [
    ({}, "requires an auth token and none was found"),
    ({"RAY_AUTH_TOKEN": "abc"}, "rejected the auth token from RAY_AUTH_TOKEN"),
])
def test_auth_failures_of_ray_init_say_what_to_do(monkeypatch, tmp_path, token_env, fragment):
    from ray.exceptions import AuthenticationError

    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in token_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ClusterError) as info, raycluster._init_errors("10.0.0.5:6379"):
        raise AuthenticationError("Unauthenticated")
    line = info.value.one_line()
    assert fragment in line and "ray get-auth-token" in line and "10.0.0.5:6379" in line


def test_a_local_ray_that_does_not_start_is_an_environment_error():
    with pytest.raises(ClusterError, match="could not start a local Ray: The current node timed out"), \
            raycluster._init_errors(None):
        raise Exception("The current node timed out during startup.\nmore detail")
    with pytest.raises(ClusterError, match="could not join the Ray cluster at h:1"), raycluster._init_errors("h:1"):
        raise SystemExit(15)


def test_a_known_harmless_traceback_is_dropped_whole_others_kept(capsys):
    logs.setup()
    block = ["Exception in thread pool-1/completion-signaler:", "Traceback (most recent call last):",
             '  File ".../ray/data/_internal/dynamic_work_queue.py", line 180, in _signal_completion',
             "    raise InterruptedError()", "InterruptedError"]
    logs.log_forwarded(forwarded(["before", *block, "after", "Traceback (most recent call last):", "ValueError: x"],
                                 task_name="ListFiles"))
    err = capsys.readouterr().err
    assert "InterruptedError" not in err and "completion-signaler" not in err
    assert [ln.split(") ", 1)[1] for ln in err.strip().splitlines()] == [
        "before", "after", "Traceback (most recent call last):", "ValueError: x"]


def test_serve_warnings_still_reach_the_terminal(capsys):
    logs.setup()
    logs.log_forwarded(forwarded([
        "INFO 2026-12-04 07:21:02,474 controller 12983 -- Deploying new version of Deployment(name='Recall').",
        "WARNING 2026-12-04 07:21:02,474 controller 12983 -- Replica 'abc' of Deployment 'Recall' failed health check.",
    ], actor_name="ServeController"))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "failed health check" in line
