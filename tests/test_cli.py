"""The command line as users meet it: help with examples, one-line errors, exit codes."""

import pytest

from tests.helpers import ROOT, make_checkpoint, run_cli

VERBS = ["prepare", "train", "evaluate", "tune", "serve", "recommend", "submit", "quickstart",
         "batch-recommend", "report", "completion"]


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


# -- actionable errors a user meets first (each: one line, exit 2, no traceback) --------------


def _in_process_error(capsys, argv, *fragments):
    from p5ray.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_data(tmp_path):
    from tests.helpers_cluster import make_prepared

    return make_prepared(tmp_path / "data")


@pytest.fixture
def restore_environment():
    import os

    from p5ray import logs

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    logs.setup()


def test_evaluate_a_checkpoint_from_another_data_set(tmp_path, capsys, small_data):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    _in_process_error(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(small_data)],
                      "was trained on other data than", "evaluate with the data directory")


def test_resume_of_a_run_that_does_not_exist(tmp_path, capsys, small_data):
    _in_process_error(capsys, ["train", "--data", str(small_data), "--storage", str(tmp_path / "runs"),
                               "--name", "nope", "--resume"], "--resume: no run at", "--storage and --name")


def test_init_from_a_missing_checkpoint(tmp_path, capsys, small_data):
    _in_process_error(capsys, ["train", "--data", str(small_data), "--init-from", str(tmp_path / "none")],
                      "does not exist", "checkpoint: PATH")


def test_mlflow_uri_without_mlflow_installed(tmp_path, capsys, small_data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    _in_process_error(capsys, ["train", "--data", str(small_data), "--storage", str(tmp_path / "runs"),
                               "--mlflow-uri", f"file:{tmp_path / 'mlruns'}"], "--mlflow-uri needs the mlflow package")
    assert not (tmp_path / "runs").exists()


def test_quickstart_input_that_does_not_exist(tmp_path, capsys):
    _in_process_error(capsys, ["quickstart", "--input", str(tmp_path / "u.data"), "--workdir", str(tmp_path / "w")],
                      "does not exist", "--input")


@pytest.mark.parametrize("address, fragment", [
    ("127.0.0.1:{port}", "no Ray cluster at RAY_ADDRESS=127.0.0.1:{port}"),
    ("http://127.0.0.1:{port}", "is a dashboard URL"),
])
def test_no_ray_cluster_at_ray_address_fails_at_once(tmp_path, capsys, small_data, monkeypatch, restore_environment,
                                                     address, fragment):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", address.format(port=port))
    start = time.monotonic()
    line = _in_process_error(capsys, ["train", "--data", str(small_data), "--storage", str(tmp_path / "runs")],
                             fragment.format(port=port))
    assert "ray start --head" in line or "p5ray submit" in line
    assert time.monotonic() - start < 30, "ray.init would have retried for minutes"


def test_verbose_error_still_ends_with_the_one_line(tmp_path, capsys, small_data):
    from p5ray.cli import main

    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(small_data), "--verbose"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("p5ray evaluate: error: checkpoint")


# -- shell completion -----------------------------------------------------------------------------


def _complete(script: str, words: list[str]) -> list[str]:
    """COMPREPLY of the bash completion function for `words` (the last one being completed)."""
    import shlex
    import subprocess

    quoted = " ".join(shlex.quote(w) for w in words)
    program = f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _p5ray; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln]


def test_bash_completion_knows_verbs_flags_choices_and_paths(capsys):
    from p5ray.cli import build_parser, main

    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    verbs = [a for a in build_parser()._subparsers._group_actions[0].choices]
    assert set(_complete(script, ["p5ray", ""])) == set(verbs) | {"--help"}
    assert _complete(script, ["p5ray", "ev"]) == ["evaluate"]
    assert "--search-space" in _complete(script, ["p5ray", "tune", "--se"])
    assert _complete(script, ["p5ray", "prepare", "--format", "j"]) == ["jsonl"]
    assert _complete(script, ["p5ray", "evaluate", "--split", ""]) == ["test", "valid"]
    assert _complete(script, ["p5ray", "completion", ""]) == ["bash", "zsh"]
    assert _complete(script, ["p5ray", "completion", "-"]) == ["--verbose", "--quiet", "--log-format"]
    assert _complete(script, ["p5ray", "train", "--config", "p5ray/configs/ti"]) == ["p5ray/configs/tiny.yaml"]
    assert _complete(script, ["p5ray", "report", "tune/smo"]) == ["tune/smoke.yaml"]
    assert _complete(script, ["p5ray", "train", "--name", "x"]) == []  # free text: nothing to offer


def test_zsh_completion_describes_every_verb_and_flag(capsys):
    import shutil
    import subprocess

    from p5ray.cli import build_parser, main

    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef p5ray")
    for verb in build_parser()._subparsers._group_actions[0].choices:
        assert f"'{verb}:" in script and f"        {verb})" in script
    assert "'--format[" in script and "(auto movielens sequence csv tsv parquet jsonl amazon-json)" in script
    assert "'*--set[" in script and "'--data[prepared data directory (from `p5ray prepare`)]:data:_files'" in script
    if shutil.which("zsh"):
        check = subprocess.run(["zsh", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


def test_completion_of_an_unknown_shell_is_a_usage_error():
    out = run_cli("completion", "fish", timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


# -- the README -----------------------------------------------------------------------------------


def _split_command(text: str) -> list[str]:
    """`p5ray VERB ARGS` of a shell line, up to the first pipe, redirection, `;`, `&&` or comment."""
    import shlex

    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if word in ("|", "||", "&&", ";", ">", ">>", "<", "&", ")"):
            break
        words.append(word)
    return words[1:]


def _readme_commands() -> list[list[str]]:
    """Every `p5ray VERB ...` of the README: lines of its code blocks (also inside `$(...)` and after
    `$ `), and inline code spans of a verb with arguments."""
    import re

    commands, in_block = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block or line.startswith("    "):
            for match in re.finditer(r"(?:^\s*(?:\$ )?|\$\()(p5ray [^)]*)", line):
                commands.append(_split_command(match.group(1)))
        else:
            for span in re.findall(r"`(p5ray [^`]+)`", line):
                words = _split_command(span)
                if len(words) >= 2:
                    commands.append(words)
    return [c for c in commands if c and not c[0].startswith("-") and not c[0].endswith(":")]  # not output


def test_every_readme_command_parses_with_the_real_parser():
    from p5ray.cli import build_parser

    commands = _readme_commands()
    seen = {argv[0] for argv in commands}
    assert {"prepare", "train", "evaluate", "serve", "recommend", "report", "tune", "completion"} <= seen, seen
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse (exit {exc.code}): p5ray {' '.join(argv)}")


def test_readme_configuration_reference_is_generated_from_the_dataclasses():
    from p5ray.config import README_MARKERS, embed_reference

    text = (ROOT / "README.md").read_text()
    assert all(marker in text for marker in README_MARKERS)
    assert embed_reference(text) == text, "run: python -m p5ray.config --readme README.md"
    for key in ("train.epochs", "train.lr", "train.batch_size", "train.seed", "model.dim", "model.layers",
                "model.max_len", "loss.alpha.recall", "loss.alpha.rank", "loss.alpha.cross_sell", "loss.alpha.rating"):
        assert f"| `{key}` |" in text, key


def test_readme_keeps_the_placeholders_other_sections_fill_in():
    text = (ROOT / "README.md").read_text()
    for name in ("cluster", "batch", "results"):
        assert f"<!-- section: {name} -->" in text
    assert "    make quickstart   #" in text and "    make test         #" in text
