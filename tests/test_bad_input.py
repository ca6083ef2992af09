"""The corpus of bad data files, in one table: each through `p5ray prepare` gives exit 2, one line
naming the file (and the first bad line where there is one), nothing on stdout, nothing at --out.

The files are in tests/fixtures/bad/. Bad requests (HTTP 422 / gRPC INVALID_ARGUMENT, never 500)
are the BAD_HTTP / BAD_GRPC tables of test_serve.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers_faults import main_in_process

BAD = Path(__file__).parent / "fixtures" / "bad"

# file in tests/fixtures/bad (or <made>), extra flags, what the one line must say
CORPUS = {
    "missing file": ("does-not-exist.csv", [], "no such file or directory"),
    "empty directory": ("<empty dir>", [], "directory holds no input files"),
    "empty file": ("empty.csv", [], "empty file"),
    "header only (CRLF)": ("header_only.csv", [], ":2: no data rows (header only)"),
    "tab-separated read as CSV": ("tabs_as_csv.tsv", ["--format", "csv"], ":1: no column 'user_id'"),
    "wrong delimiter": ("wrong_delimiter.csv", [], ":2: no row could be read"),
    "binary data": ("binary.bin", [], "binary data"),
    "UTF-16 text": ("utf16.csv", [], "UTF-16 text is not supported"),
    "truncated gzip": ("truncated.csv.gz", [], "broken gzip file"),
    "unrecognisable format": ("unknown_format.txt", [], ":1: cannot tell the format"),
    "non-numeric rating": ("bad_ratings.csv", [], ":3: 1 of 3 rows are bad"),
    "numeric column turns to text after 3,000 rows": ("numeric_then_text.csv", [], ":3002: 100 of 3100 rows are bad"),
    "rating out of range (MovieLens)": ("u.data", [], ":1: 20 of 200 rows are bad"),
    "missing user ids": ("missing_ids.csv", [], ":2: 40 of 200 rows are bad"),
    "wrong field count": ("wrong_field_count.csv", [], ":2: 15 of 100 rows are bad"),
    "broken JSON lines": ("broken.jsonl", [], ":1: 34 of 100 rows are bad"),
}
REASONS = {  # the reason a row-level refusal names for its first bad row
    "numeric column turns to text after 3,000 rows": "non-numeric timestamp",
    "rating out of range (MovieLens)": "rating out of range",
    "missing user ids": "missing user id",
    "wrong field count": "wrong number of fields",
    "broken JSON lines": "not a JSON object",
    "non-numeric rating": "non-numeric rating",
}


def input_path(name: str, tmp_path: Path) -> Path:
    if name == "<empty dir>":
        (tmp_path / "in").mkdir()
        return tmp_path / "in"
    return BAD / name


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_data_file_is_refused_with_one_line_and_no_output(case, tmp_path, capsys):
    name, extra, expect = CORPUS[case]
    path = input_path(name, tmp_path)
    out = tmp_path / "out"
    assert main_in_process(["prepare", "--input", str(path), "--out", str(out), "--quiet", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"p5ray prepare: error: {path}"), captured.err
    assert expect in lines[0] and REASONS.get(case, "") in lines[0], lines[0]
    assert captured.out == "" and "Traceback" not in captured.err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_process_exit_code_is_2():
    """The table runs cli.main in this process; the real process exits with the same code."""
    done = subprocess.run([sys.executable, "-m", "p5ray.cli", "prepare", "--input", str(BAD / "empty.csv"),
                           "--out", "/nonexistent/out", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout == "" and "empty file" in done.stderr
