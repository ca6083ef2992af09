"""Input resolution and format sniffing (p5ray/formats.py): pure, no Ray."""

import os
import shutil
from pathlib import Path

import pytest

from p5ray.errors import DataError
from p5ray.ingest import formats

FIXTURES = Path(__file__).parent / "fixtures" / "prepare"
DATA = Path(__file__).parent.parent / "data"


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("messy.csv", "csv"),
        ("latin1.tsv", "tsv"),
        ("ratings.dat", "movielens"),
        ("ratings.csv", "movielens"),
        ("reviews.json", "amazon-json"),
        ("events.jsonl", "jsonl"),
        ("sequence.txt", "sequence"),
    ],
)
def test_auto_sniffs_each_format(name, fmt):
    assert formats.resolve(str(FIXTURES / name)).format == fmt


def test_auto_on_the_bundled_data():
    assert formats.resolve(str(DATA / "ml-100k" / "u.data")).format == "movielens"
    assert formats.resolve(str(DATA / "ml-100k")).files[0].endswith("u.data")
    assert formats.resolve(str(DATA / "amazon-beauty" / "Beauty.txt")).format == "sequence"


@pytest.mark.parametrize(
    "content, fmt, message",
    [
        (b"", "auto", "empty file"),
        (b"\xef\xbb\xbf\n\n", "auto", "empty file"),
        (b"u1,i1\x00\x01\x02,1\n", "auto", "binary data"),
        ("user_id,item_id\n".encode("utf-16"), "auto", "UTF-16"),
        (b"user_id\titem_id\ttimestamp\nu1\ti1\t1\n", "csv", "looks tab-separated"),
        (b"a,b,c\n1,2,3\n", "auto", "cannot tell the format"),
    ],
)
def test_unusable_files_fail_with_the_file_named(tmp_path, content, fmt, message):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        formats.resolve(str(path), fmt)
    assert message in err.value.one_line() and str(path) in err.value.one_line()


def test_missing_and_unreadable_inputs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        formats.resolve(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="no input files"):
        formats.resolve(str(tmp_path))
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "log.csv").write_text("user_id,item_id\nu,i\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as m:  # tests may run as root, where chmod 000 is no obstacle
        m.setattr(Path, "iterdir", refuse)
        with pytest.raises(DataError, match="cannot read directory: Permission denied"):
            formats.resolve(str(locked))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match="cannot read file"):
        formats.resolve(str(locked / "log.csv"))


def test_a_directory_of_parts_must_share_columns(tmp_path):
    shutil.copy(FIXTURES / "messy.csv", tmp_path / "part-1.csv")
    (tmp_path / "part-2.csv").write_text("item_id,user_id\ni,u\n")
    with pytest.raises(DataError, match="columns differ"):
        formats.resolve(str(tmp_path), "csv")
