"""Batch-scoring input (no Ray): a Parquet or CSV file, or a folder of them, local or `s3://`
(through the storage filesystem: endpoint, region and credentials as everywhere else).

Columns are checked against the version's signature from file metadata before anything is
scored. Reading is split into pieces of bounded size: Parquet by row groups (several read tasks
per file, each streaming record batches), CSV one streaming task per file. Every row carries
its row id: the configured id column, or `source_file` (the path relative to the input; the file
name for a single file) and `source_row` (0-based data row within that file).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from mlops_ray.errors import InputInvalid, StorageError
from mlops_ray.storage import Storage, resolve

PARQUET_EXT = (".parquet", ".pq")
CSV_EXT = (".csv", ".csv.gz")
TASK_ROWS = 131_072  # consecutive Parquet row groups per read task, up to about this many rows
BLOCK_ROWS = 65_536  # rows per block a read task yields (Parquet record batches)
CSV_BLOCK_BYTES = 4 << 20  # bytes of CSV text parsed at a time
SOURCE_FILE, SOURCE_ROW = "source_file", "source_row"


@dataclass(frozen=True)
class InputFile:
    path: str  # inside the filesystem
    name: str  # relative to the input URI: the `source_file` column


@dataclass(frozen=True)
class ReadUnit:
    """One read task: consecutive row groups of a Parquet file, or a whole CSV file."""
    file: InputFile
    row_groups: tuple[int, ...]
    first_row: int
    rows: int | None
    size_bytes: int | None


def _kind_of(name: str) -> str | None:
    low = name.lower()
    return "parquet" if low.endswith(PARQUET_EXT) else "csv" if low.endswith(CSV_EXT) else None


class TableInput:
    """The files behind an input URI. Picklable: read tasks get it with the filesystem."""

    def __init__(self, uri: str, fmt: str = "auto", endpoint_url: str | None = None,
                 region: str | None = None):
        self.uri = uri
        self.storage: Storage = resolve(uri, endpoint_url, region)
        fs, root = self.storage.fs, self.storage.root
        try:
            info = fs.get_file_info(root)
        except OSError as e:
            raise StorageError(f"input='{uri}': cannot read ({e})") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"input='{uri}': no such file or folder")
        if info.type == pafs.FileType.File:
            files = [InputFile(root, root.rsplit("/", 1)[-1])]
        else:  # a folder: every data file below it; names starting with _ or . are skipped
            sel = pafs.FileSelector(root, recursive=True)
            found = []
            for i in fs.get_file_info(sel):
                rel = i.path[len(root.rstrip("/")) + 1:]
                if i.type == pafs.FileType.File and not any(
                        p.startswith(("_", ".")) for p in rel.split("/")):
                    found.append(InputFile(i.path, rel))
            files = sorted(found, key=lambda f: f.name)
            if fmt == "auto":
                files = [f for f in files if _kind_of(f.name)]
            else:
                ext = PARQUET_EXT if fmt == "parquet" else CSV_EXT
                files = [f for f in files if f.name.lower().endswith(ext)]
            if not files:
                raise StorageError(f"input='{uri}': the folder holds no "
                                   f"{'.parquet/.pq/.csv' if fmt == 'auto' else fmt} files")
        kinds = {fmt} if fmt != "auto" else {_kind_of(f.name) for f in files}
        if None in kinds:
            raise InputInvalid(uri, [
                f"predict.format='auto' cannot tell the format of '{files[0].name}' (allowed: a "
                ".parquet/.pq/.csv/.csv.gz name, or set predict.format=parquet|csv)"])
        if len(kinds) > 1:
            raise InputInvalid(uri, ["the folder mixes Parquet and CSV files: set "
                                            "predict.format=parquet or predict.format=csv"])
        self.format: str = str(kinds.pop())
        self.files = files

    # ---------------------------------------------------------------- metadata
    def _parquet(self, f: InputFile) -> Any:
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(self.storage.fs.open_input_file(f.path))
        except (OSError, pa.ArrowInvalid) as e:
            raise InputInvalid(self.uri, [f"{f.name}: not a readable Parquet file ({e})"]
                                      ) from None

    def _csv_header(self, f: InputFile) -> list[str]:
        import pyarrow.csv as pacsv
        try:
            with self.storage.fs.open_input_stream(f.path, compression="detect") as s:
                reader = pacsv.open_csv(s, read_options=pacsv.ReadOptions(block_size=1 << 16))
                return list(reader.schema.names)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputInvalid(self.uri, [f"{f.name}: not a readable CSV file ({e})"]
                                      ) from None

    def schema(self, f: InputFile) -> dict[str, pa.DataType | None]:
        """Column -> Arrow type (None for CSV: typed while reading)."""
        if self.format == "parquet":
            return {fld.name: fld.type for fld in self._parquet(f).schema_arrow}
        return dict.fromkeys(self._csv_header(f))

    def check(self, signature: dict[str, Any], id_column: str | None,
              extra: list[str]) -> list[str]:
        """Columns to read (signature inputs, `extra` where every file has them, the id column),
        or DataValidationError naming every missing or mistyped column of every file."""
        required = [i for i in signature["inputs"] if i.get("required", True)]
        numeric = {i["name"] for i in signature["inputs"] if i["kind"] == "numeric"}
        allowed = ", ".join(i["name"] for i in required)
        problems: list[str] = []
        optional = [i["name"] for i in signature["inputs"] if not i.get("required", True)]
        present_everywhere = set(optional) | set(extra)
        for f in self.files:
            cols = self.schema(f)
            for i in required:
                if i["name"] not in cols:
                    problems.append(f"{f.name}: required column '{i['name']}' is missing "
                                    f"(the model needs: {allowed})")
            for name, t in cols.items():
                if name in numeric and t is not None and not (
                        pa.types.is_integer(t) or pa.types.is_floating(t)
                        or pa.types.is_decimal(t) or pa.types.is_boolean(t)
                        or pa.types.is_null(t)):
                    problems.append(f"{f.name}: column '{name}' has type {t}; the model needs "
                                    "numbers there")
            if id_column is not None and id_column not in cols:
                problems.append(f"{f.name}: predict.id_column='{id_column}' is not a column "
                                f"(columns: {', '.join(cols)})")
            present_everywhere &= set(cols)
        if problems:
            raise InputInvalid(self.uri, problems)
        names = [i["name"] for i in signature["inputs"] if i.get("required", True)]
        names += [c for c in [*optional, *extra] if c in present_everywhere]
        if id_column is not None:
            names.append(id_column)
        return list(dict.fromkeys(names))

    def units(self) -> list[ReadUnit]:
        out = []
        for f in self.files:
            if self.format == "csv":
                size = self.storage.fs.get_file_info(f.path).size
                out.append(ReadUnit(f, (), 0, None, size))
                continue
            meta = self._parquet(f).metadata
            start, groups, rows, size = 0, [], 0, 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                groups.append(g)
                rows += rg.num_rows
                size += rg.total_byte_size
                if rows >= TASK_ROWS or g == meta.num_row_groups - 1:
                    out.append(ReadUnit(f, tuple(groups), start, rows, size))
                    start, groups, rows, size = start + rows, [], 0, 0
        return out

    # ---------------------------------------------------------------- reading
    def read(self, unit: ReadUnit, columns: list[str], numeric: list[str],
             id_column: str | None) -> Iterator[pa.Table]:
        """Blocks of `columns` (+ source_file/source_row without an id column)."""
        row = unit.first_row
        for batch in (self._read_parquet(unit, columns) if self.format == "parquet"
                      else self._read_csv(unit, columns, numeric, id_column)):
            t = pa.Table.from_batches([batch]).select(columns)
            if id_column is None:
                n = t.num_rows
                t = t.append_column(SOURCE_FILE, pa.DictionaryArray.from_arrays(
                    pa.array([0] * n, pa.int32()), pa.array([unit.file.name])))
                t = t.append_column(SOURCE_ROW, pa.array(range(row, row + n), pa.int64()))
                row += n
            yield t

    def _read_parquet(self, unit: ReadUnit, columns: list[str]) -> Iterator[pa.RecordBatch]:
        pf = self._parquet(unit.file)
        yield from pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=list(unit.row_groups),
                                   columns=columns)

    def _read_csv(self, unit: ReadUnit, columns: list[str], numeric: list[str],
                  id_column: str | None) -> Iterator[pa.RecordBatch]:
        import pyarrow.csv as pacsv
        f = unit.file
        header = self._csv_header(f)
        # features typed like training reads them; the id column keeps its inferred type
        types = {c: (pa.float64() if c in numeric else pa.string())
                 for c in columns if c in header and c != id_column}
        conv = pacsv.ConvertOptions(include_columns=columns, column_types=types,
                                    strings_can_be_null=True)
        try:
            with self.storage.fs.open_input_stream(f.path, compression="detect") as s:
                reader = pacsv.open_csv(s, read_options=pacsv.ReadOptions(
                    block_size=CSV_BLOCK_BYTES), convert_options=conv)
                yield from reader
        except pa.ArrowInvalid as e:
            msg = str(e)
            m = re.search(r"column #(\d+)", msg)
            if m and int(m.group(1)) < len(header):
                msg = f"column '{header[int(m.group(1))]}': {msg}"
            raise InputInvalid(self.uri, [f"{f.name}: {msg}"]) from None
