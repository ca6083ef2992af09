"""The command line as users meet it: help with examples, one-line errors, exit codes."""

import pytest

from tests.helpers import run_cli

VERBS = ["prepare", "train", "evaluate", "tune", "serve", "recommend", "submit", "quickstart",
         "batch-recommend", "report"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb):
    out = run_cli(verb, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "example" in out.stdout.lower()
    assert f"p5ray {verb}" in out.stdout


def _one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_missing_checkpoint_is_exit_2_one_line(tmp_path):
    out = run_cli("evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"))
    _one_line_error(out, "does not exist")


def test_missing_data_dir_for_train(tmp_path):
    _one_line_error(run_cli("train", "--data", str(tmp_path / "nodata")), "does not exist", "p5ray prepare")


def test_unknown_config_key_is_rejected_before_anything_starts(tmp_path, ml_small_data):
    out = run_cli("train", "--data", str(ml_small_data), "--set", "train.epocs=3")
    _one_line_error(out, "train.epocs")


def test_bad_usage_exits_2():
    out = run_cli("train")
    assert out.returncode == 2 and "--data" in out.stderr


def test_verbose_shows_the_traceback(tmp_path):
    out = run_cli("evaluate", "--checkpoint", str(tmp_path / "x"), "--data", str(tmp_path), "--verbose")
    assert out.returncode == 2 and "Traceback" in out.stderr
