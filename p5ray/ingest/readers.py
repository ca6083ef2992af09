"""Reading interaction logs in byte ranges with known line numbers.

The driver cuts each plain text file into ranges that end on a newline, counting newlines as it
goes, so every range knows the number of its first line (`plan_ranges`). A Ray Data read task turns one range into a
lines table `file`, `line`, `raw` (`read_range`); `parsers.parse_lines` does the rest. Gzip files
are one range each (they cannot be seeked), read as a stream; Parquet is split by row group.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p5ray.errors import DataError
from p5ray.ingest.parsers import LogSpec

HEAD_BYTES = 1 << 16
GZIP_MAGIC, PARQUET_MAGIC, BOM = b"\x1f\x8b", b"PAR1", b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ByteRange:
    """One read task: bytes [start, end) of a file (end None: to the end), first line's number."""

    file: int
    path: str
    start: int
    end: int | None
    first_line: int
    kind: str = "text"  # text | gzip | parquet (start = row group, first_line = its first row)


def read_head(path: Path, nbytes: int = HEAD_BYTES) -> bytes:
    """The first bytes of a file, decompressed if gzip; raises DataError for empty files."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == GZIP_MAGIC:
            try:
                head = gzip.GzipFile(fileobj=f).read(nbytes)
            except (OSError, EOFError) as exc:
                raise DataError(str(path), f"broken gzip file: {exc}") from exc
        else:
            head = f.read(nbytes)
    if magic == PARQUET_MAGIC:
        return head
    if not head.removeprefix(BOM).strip():
        raise DataError(str(path), "empty file: no rows to read", hint="check --input")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(str(path), "UTF-16 text is not supported", hint="convert the file to UTF-8")
    if b"\x00" in head:
        line = head[: head.index(b"\x00")].count(b"\n") + 1
        raise DataError(
            str(path), "binary data (NUL byte), not a text log", line=line, hint="check --input"
        )
    return head


def head_lines(head: bytes, n: int = 20) -> list[str]:
    """Up to n complete non-blank lines of a head (the last, maybe cut, line is left out)."""
    text = decode(head.removeprefix(BOM))
    lines = text.split("\n")
    if len(head) >= HEAD_BYTES:
        lines = lines[:-1]
    return [ln.rstrip("\r") for ln in lines if ln.strip()][:n]


def decode(data: bytes) -> str:
    """UTF-8, or latin-1 line by line where a line is not valid UTF-8 (old MovieLens files)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(_decode_line(part) for part in data.split(b"\n"))


def _decode_line(part: bytes) -> str:
    try:
        return part.decode("utf-8")
    except UnicodeDecodeError:
        return part.decode("latin-1")


def plan_ranges(spec: LogSpec, chunk_bytes: int = 32 << 20, min_tasks: int = 16) -> list[ByteRange]:
    """Cut every input file into read tasks; text ranges end on a newline and know their first line.

    Ranges are at most `chunk_bytes`, and small enough that a log of a few MB still gives about
    `min_tasks` tasks (parsing runs in parallel), but not under 1 MiB.
    """
    total = sum(Path(name).stat().st_size for name in spec.files)
    chunk_bytes = max(1, min(chunk_bytes, max(1 << 20, -(-total // min_tasks))))
    ranges: list[ByteRange] = []
    for i, name in enumerate(spec.files):
        path = Path(name)
        with open(path, "rb") as f:
            magic = f.read(4)
        if spec.layout == "parquet":
            meta = pq.ParquetFile(path).metadata
            first = 1
            for g in range(meta.num_row_groups):
                ranges.append(ByteRange(i, name, g, None, first, "parquet"))
                first += meta.row_group(g).num_rows
        elif magic[:2] == GZIP_MAGIC:
            ranges.append(ByteRange(i, name, 0, None, 1, "gzip"))
        else:
            ranges.extend(_text_ranges(i, path, chunk_bytes))
    return ranges


def _text_ranges(file: int, path: Path, chunk_bytes: int) -> list[ByteRange]:
    size = path.stat().st_size
    out, start, line = [], 0, 1
    with open(path, "rb") as f:
        pos = 0
        count = 0  # newlines in [start, pos) so far
        while pos < size:
            block = f.read(min(1 << 22, size - pos))
            if not block:
                break
            i = 0
            while True:
                target = start + chunk_bytes - pos
                nl = block.find(b"\n", max(target, i)) if target < len(block) else -1
                if nl < 0:
                    count += block.count(b"\n", i)
                    break
                count += block.count(b"\n", i, nl + 1)
                out.append(ByteRange(file, str(path), start, pos + nl + 1, line))
                start, line, count, i = pos + nl + 1, line + count, 0, nl + 1
            pos += len(block)
    if start < size:
        out.append(ByteRange(file, str(path), start, size, line))
    return out


def read_range(r: ByteRange, spec: LogSpec, lines_per_table: int = 1 << 18) -> Iterator[pa.Table]:
    """One read task: tables of `file`, `line`, `raw` (parquet: role columns as text, too)."""
    if r.kind == "parquet":
        yield _parquet_rows(r, spec)
        return
    skip = 1 if spec.header else 0
    if r.kind == "gzip":
        with gzip.open(r.path, "rb") as f:
            yield from _stream_lines(r.file, f, skip, lines_per_table)
        return
    with open(r.path, "rb") as f:
        f.seek(r.start)
        data = f.read(r.end - r.start)
    if r.start == 0:
        data = data.removeprefix(BOM)
    yield from _line_tables(
        r.file, r.first_line, data, skip if r.start == 0 else 0, lines_per_table
    )


def _stream_lines(
    file: int, f: io.BufferedIOBase, skip: int, lines_per_table: int
) -> Iterator[pa.Table]:
    line, carry, first = 1, b"", True
    while True:
        block = f.read(8 << 20)
        data = carry + block
        if first:
            data, first = data.removeprefix(BOM), False
        if block:
            cut = data.rfind(b"\n") + 1
            data, carry = data[:cut], data[cut:]
        if data:
            yield from _line_tables(file, line, data, skip, lines_per_table)
            line += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            skip = 0
        if not block:
            return


def _line_tables(
    file: int, first_line: int, data: bytes, skip: int, lines_per_table: int
) -> Iterator[pa.Table]:
    """Complete lines of `data` (numbered from first_line) as tables, split by Arrow, not Python."""
    lines = pc.list_flatten(pc.split_pattern(pa.array([decode(data)], pa.large_string()), "\n"))
    if data.endswith(b"\n"):
        lines = lines.slice(0, len(lines) - 1)
    if b"\r" in data:  # Windows line endings
        lines = pc.replace_substring_regex(lines, r"\r$", "")
    lines = lines.cast(pa.string())
    for lo in range(skip, len(lines), lines_per_table):
        part = lines.slice(lo, lines_per_table)
        yield pa.table(
            {
                "file": pa.array(np.full(len(part), file, np.int32)),
                "line": pa.array(
                    np.arange(first_line + lo, first_line + lo + len(part), dtype=np.int64)
                ),
                "raw": part,
            }
        )


def _parquet_rows(r: ByteRange, spec: LogSpec) -> pa.Table:
    table = pq.ParquetFile(r.path).read_row_group(
        r.start, columns=sorted(set(spec.fields.values()))
    )
    n = table.num_rows
    cols = {
        "file": pa.array([r.file] * n, pa.int32()),
        "line": pa.array(range(r.first_line, r.first_line + n), pa.int64()),
        "pos": pa.array([0] * n, pa.int32()),
    }
    for role, name in spec.fields.items():
        cols[role] = _as_text(table[name])
    shown = [pc.fill_null(cols[role], "") for role in spec.fields]
    cols["raw"] = pc.binary_join_element_wise(*shown, ",")
    return pa.table(cols)


def _as_text(col: pa.ChunkedArray) -> pa.Array:
    """A Parquet column as text for the common validation; timestamps become epoch seconds."""
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string()).combine_chunks()
