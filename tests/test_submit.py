"""`p5ray submit` without a cluster: address and token resolution, what is uploaded, path
warnings, the stdout/stderr split, the job entrypoint, and the exit-2 refusals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p5ray import cli, jobentry, submit
from p5ray.errors import ClusterError

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


# -- address and token --------------------------------------------------------------------


def test_address_from_flag_then_env_then_default(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert submit.resolve_address("http://flag:8265/") == "http://flag:8265"
    assert submit.resolve_address(None) == "http://env:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert submit.resolve_address(None) == submit.DEFAULT_ADDRESS
    assert submit.resolve_address("head:8265") == "http://head:8265"
    with pytest.raises(ClusterError, match="not a Ray dashboard address"):
        submit.resolve_address("ray://head:10001")


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_sources_in_rays_order(no_token_env, monkeypatch):
    assert submit.find_token()[0] is None
    default = no_token_env / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-home\n")
    assert submit.find_token() == ("from-home", str(default))
    path = no_token_env / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert submit.find_token() == ("from-path", str(path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.find_token()[0] is None


def test_token_path_that_does_not_exist_is_refused(no_token_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_token_env / "missing"))
    with pytest.raises(ClusterError, match="does not exist"):
        submit.find_token()


def test_sdk_failures_become_one_line_cluster_errors():
    from ray.exceptions import AuthenticationError

    anonymous = submit.Connection("http://h:8265", None, "no token")
    with pytest.raises(ClusterError, match="requires an auth token and none was found"):
        with anonymous.errors():
            raise AuthenticationError("Authentication required")
    with pytest.raises(ClusterError, match="rejected the auth token from RAY_AUTH_TOKEN"):
        with submit.Connection("http://h:8265", "t", "RAY_AUTH_TOKEN").errors():
            raise AuthenticationError("Authentication failed")
    with pytest.raises(ClusterError, match="no Ray cluster answers at http://h:8265") as caught:
        with anonymous.errors():
            raise ConnectionError("refused")
    assert "\n" not in caught.value.one_line()


def test_no_cluster_at_the_address_exits_2_with_one_line():
    from tests.helpers_cluster import free_port

    done = run_module("p5ray.cli", "submit", "--address", f"http://127.0.0.1:{free_port()}", "--",
                      "evaluate", "--checkpoint", "/no/ckpt", "--data", "/no/data")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no Ray cluster answers" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["submit"], "nothing to submit"),
    (["submit", "--status", "j", "--", "train"], "not both"),
    (["submit", "--", "submit", "--", "train"], "cannot submit again"),
])
def test_submit_usage_errors_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_verbs_own_usage_errors_show_before_any_upload(capsys):
    assert cli.main(["submit", "--address", "http://127.0.0.1:9", "--", "train"]) == 2
    assert "--data" in capsys.readouterr().err  # train's parser, not a connection error


def test_entrypoint_runs_the_verb_through_jobentry_with_quoting():
    assert submit.entrypoint(["train", "--name", "a b"]) == "python -m p5ray.jobentry train --name 'a b'"


# -- what is uploaded and which paths the job can reach ---------------------------------------


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    for rel in ("p5ray/a.py", "data/raw/u.data", "runs/x/model.pt", ".venv/lib/y.py",
                "prepared/train.parquet", "secret/key", "p5ray/__pycache__/a.pyc"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / ".gitignore").write_text("secret/\n")
    with open(root / "data" / "huge.bin", "wb") as f:  # sparse: no disk used
        f.truncate((submit.MAX_FILE_MB + 1) * 2**20)
    return root


def test_upload_excludes_caches_runs_outputs_gitignored_and_big_files(project):
    excludes, big = submit.upload_excludes(project)
    assert big == ["/data/huge.bin"]
    spec = submit.exclude_spec(project, excludes)
    uploaded = {rel: submit.is_uploaded(project, Path(rel), spec) for rel in (
        "p5ray/a.py", "data/raw/u.data", "data/raw", "runs/x/model.pt", ".venv/lib/y.py",
        "prepared/train.parquet", "prepared", "secret/key", "data/huge.bin", "data",
        "p5ray/__pycache__/a.pyc",
    )}
    assert uploaded == {
        "p5ray/a.py": True, "data/raw/u.data": True, "data/raw": True, "runs/x/model.pt": False,
        ".venv/lib/y.py": False, "prepared/train.parquet": False, "prepared": False,
        "secret/key": False, "data/huge.bin": False, "data": False, "p5ray/__pycache__/a.pyc": False,
    }


def test_runtime_env_uploads_the_project_or_else_the_package():
    env = submit.runtime_env(ROOT, ["x"])
    assert env["working_dir"] == str(ROOT) and env["excludes"] == ["x"]
    assert env["env_vars"]["RAY_DATA_LOG_LEVEL"] == "ERROR"  # raycluster.QUIET_ENV
    assert "RAY_DATA_LOG_LEVEL" not in submit.runtime_env(ROOT, [], verbose=True)["env_vars"]
    assert submit.runtime_env(None, [])["py_modules"] == [str(ROOT / "p5ray")]


def warnings_for(project: Path, argv: list[str], cwd: Path | None = None) -> list[str]:
    excludes, _ = submit.upload_excludes(project)
    return submit.path_warnings(argv, project, submit.exclude_spec(project, excludes), cwd or project)


def test_no_warnings_for_uploaded_relative_paths_shared_absolute_paths_and_uris(project):
    assert warnings_for(project, ["prepare", "--input", "data/raw/u.data", "--out", "/shared/ml"]) == []
    assert warnings_for(project, ["train", "--data", "/shared/ml", "--storage", "s3://b/runs"]) == []


@pytest.mark.parametrize("argv, expected", [
    (["train", "--data", "prepared", "--storage", "/shared/r"], "prepared is in the local project directory but not (all) uploaded"),
    (["train", "--data", "/shared/ml"], "train without --storage"),
    (["evaluate", "--checkpoint", "/c", "--data", "/d", "--output", "m.json"], "--output m.json is relative"),
    (["evaluate", "--checkpoint=runs/x", "--data", "/d"], "runs/x is in the local project directory"),
    (["report", "runs/x"], "runs/x is in the local project directory"),
])
def test_warns_about_paths_the_job_cannot_read_or_keep(project, argv, expected):
    found = warnings_for(project, argv)
    assert any(expected in w for w in found), found


def test_warns_about_absolute_and_cwd_relative_paths_into_the_project(project):
    assert any("points into the local project directory" in w
               for w in warnings_for(project, ["prepare", "--input", str(project / "data/raw/u.data"), "--out", "/s"]))
    assert any("resolves against the uploaded project directory" in w
               for w in warnings_for(project, ["prepare", "--input", "raw/u.data", "--out", "/s"], project / "data"))


# -- the job's log: stdout back to stdout, the rest to stderr ---------------------------------


def test_stream_splitter_reassembles_lines_across_chunks():
    out, err = io.StringIO(), io.StringIO()
    splitter = submit.StreamSplitter(out, err)
    for chunk in ["Running entrypoint\n[std", "out] checkpoint: /x\nlog li", "ne\n[stdout] last"]:
        splitter.feed(chunk)
    splitter.close()
    assert out.getvalue() == "checkpoint: /x\nlast\n"
    assert err.getvalue() == "Running entrypoint\nlog line\n"


def test_stream_splitter_passes_logs_of_foreign_jobs_to_stdout():
    out, err = io.StringIO(), io.StringIO()
    splitter = submit.StreamSplitter(out, err, marked=False)
    splitter.feed("a\nb\n")
    assert (out.getvalue(), err.getvalue()) == ("a\nb\n", "")


@pytest.mark.parametrize("line, forwarded", [
    (b"\x1b[33m(raylet)\x1b[0m WARNING: 9 PYTHON worker processes\n", True),
    (b"(RayTrainWorker pid=12, ip=10.0.0.1) hello\n", True),
    (b"\x1b[36m(pid=29024)\x1b[0m - ReadFiles\n", True),
    (b"(autoscaler +3s) Adding 1 node\n", True),
    (b"checkpoint: /shared/runs/x\n", False),
    (b'{"full/ndcg@10": 0.1}\n', False),
    (b"(not a ray prefix) text\n", False),
])
def test_jobentry_tells_forwarded_ray_logs_from_results(line, forwarded):
    assert bool(jobentry.FORWARDED.match(line)) is forwarded


def test_jobentry_marks_the_verbs_stdout_and_keeps_its_exit_code():
    helped = run_module("p5ray.jobentry", "evaluate", "--help")
    assert helped.returncode == 0
    assert helped.stdout and all(line.startswith(submit.STDOUT_MARK) for line in helped.stdout.splitlines())
    failed = run_module("p5ray.jobentry", "evaluate", "--checkpoint", "/no/ckpt", "--data", "/no/data")
    assert failed.returncode == 2 and failed.stdout == ""
    assert "p5ray evaluate: error" in failed.stderr
