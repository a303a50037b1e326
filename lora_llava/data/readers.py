"""Dataset files -> records: LLaVA JSON / JSON Lines, and Hugging Face datasets.

Reading a dataset reads its index only. A LLaVA JSON file is parsed once,
record by record, and each record is kept as its raw JSON bytes in one buffer
(`RecordStore`): 665K records cost one `bytes` object and an offset array
instead of millions of Python objects, which DataLoader workers would
otherwise copy page by page as they touch their reference counts. A record is
parsed again when its sample is loaded.

Hugging Face datasets stay memory-mapped Arrow; their image columns are read
undecoded (`{"bytes", "path"}`), and `iter_hf` reads image references
without pulling the image bytes into Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..recipe.schema import DatasetSpec
from .columns import say_once
from .formats import detect_format

EMBEDDED = "<embedded image>"  # image reference of an image stored inside a dataset
_SEP = re.compile(r"[\s,]*")


class RecordStore:
    """Records as raw JSON in one buffer; `store[i]` parses record i."""

    def __init__(self, blob: bytes, starts: np.ndarray, ends: np.ndarray):
        self.blob, self.starts, self.ends = blob, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return json.loads(self.blob[self.starts[i] : self.ends[i]])

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


def _store(blob: bytes, spans: list[tuple[int, int]]) -> RecordStore:
    starts = np.fromiter((a for a, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((b for _, b in spans), dtype=np.int64, count=len(spans))
    return RecordStore(blob, starts, ends)


def read_llava(path: str | Path, visit: Callable[[int, Any], None] | None = None) -> RecordStore:
    """A LLaVA JSON list or JSON Lines file; `visit(i, record)` sees each record as it is parsed."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    raw = p.read_bytes()
    if p.suffix == ".jsonl":
        return _read_lines(raw, path, visit)
    return _read_list(raw, path, visit)


def _read_lines(raw: bytes, path: str | Path, visit) -> RecordStore:
    spans, pos = [], 0
    for n, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n}: not UTF-8 text ({e.reason} at byte {pos + e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {n}: JSON nested too deeply") from None
            if visit is not None:
                visit(len(spans), record)
            spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return _store(raw, spans)


def _read_list(raw: bytes, path: str | Path, visit) -> RecordStore:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    decoder = json.JSONDecoder()
    pos = _SEP.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path}: expected a JSON list of samples")
    spans = []
    pos = _SEP.match(text, pos + 1).end()
    try:
        while not text.startswith("]", pos):
            record, end = decoder.raw_decode(text, pos)
            if visit is not None:
                visit(len(spans), record)
            spans.append((pos, end))
            pos = _SEP.match(text, end).end()
    except (json.JSONDecodeError, IndexError) as e:
        line = text.count("\n", 0, getattr(e, "pos", pos)) + 1
        raise DataError(f"{path}: invalid JSON at line {line} ({getattr(e, 'msg', 'unexpected end of file')})") from None
    except RecursionError:
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"{path}: invalid JSON at line {line} (nested too deeply)") from None
    if text.isascii():  # character offsets are byte offsets: keep the file's bytes as they are
        return _store(raw[len(raw) - len(text) :], spans)
    parts = [text[a:b].encode("utf-8") for a, b in spans]
    ends = np.cumsum([len(b) for b in parts], dtype=np.int64)
    return RecordStore(b"".join(parts), ends - [len(b) for b in parts], ends)


# Split names a folder of parquet files may use: `train-00000-of-00001.parquet`, `data/test.parquet`, `validation/0000.parquet`.
KNOWN_SPLITS = ("train", "test", "validation", "val", "valid", "dev", "eval")
_SPLIT_PREFIX = re.compile(r"^([A-Za-z0-9]+)(?=[-_.])")


_HUB_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}")  # `validation_matched-00000-of-00001-<hash>.parquet`


def _split_of(f: Path, root: Path, names: tuple[str, ...]) -> str | None:
    """The split a parquet file belongs to, from its name or its folder; None when neither names one."""
    m = _HUB_SHARD.match(f.name)
    if m:  # the hub's own shard naming names the split, whatever it is called
        return m.group(1)
    m = _SPLIT_PREFIX.match(f.name)
    if m and m.group(1) in names:
        return m.group(1)
    parents = f.relative_to(root).parts[:-1]
    return next((d for d in reversed(parents) if d in names), None)


def _choose(available: list[str], split: str | tuple[str, ...] | None, path: str | Path) -> str:
    """The split to read: the one asked for, or the first of a list that exists; never a silent fallback."""
    wanted = (split,) if isinstance(split, str) else tuple(split or ("train",))
    chosen = next((s for s in wanted if s in available), None)
    if chosen is None:
        raise DataError(f"{path}: no split {' / '.join(wanted)} (it has {', '.join(available)}); set split: to one of them")
    if len(wanted) > 1 and len(available) > 1:
        say_once(f"{path}: reading split {chosen!r} (the first of {', '.join(wanted)} it has; set split: to choose)")
    return chosen


def _parquet_files(p: Path, split: str | tuple[str, ...] | None) -> list[str]:
    """The parquet files of the requested split; a folder whose files name no split is one dataset."""
    files = sorted(f for f in p.rglob("*.parquet") if not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"{p}: neither a save_to_disk folder nor a folder of parquet files")
    names = tuple(dict.fromkeys((*KNOWN_SPLITS, *((split,) if isinstance(split, str) else split or ()))))
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, p, names) or "", []).append(str(f))
    if set(by_split) == {""}:
        return by_split[""]
    if "" in by_split:
        odd = ", ".join(Path(f).name for f in by_split[""][:3])
        raise DataError(f"{p}: parquet files of named splits ({', '.join(s for s in by_split if s)}) beside others ({odd}); "
                        "give one file or a folder of one split as path")
    return by_split[_choose(sorted(by_split), split, p)]


def read_hf(path: str | Path, split: str | tuple[str, ...] | None = "train"):
    """A `save_to_disk` folder (a DatasetDict: the split asked for), a folder of parquet files, or a file, as a Dataset."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file not found")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # a damaged or foreign folder; datasets raises many types
            raise DataError(f"{path}: cannot read as a save_to_disk folder ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_choose(list(ds), split, path)]
        return ds
    files = _parquet_files(p, split) if p.is_dir() else [str(p)]
    kind = {".parquet": "parquet", ".arrow": "arrow"}.get(Path(files[0]).suffix, "json")
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # datasets raises many types for a file it cannot read
        raise DataError(f"{path}: cannot read as a {kind} dataset ({type(e).__name__}: {e})") from None


class ArrowRows:
    """Rows of a `datasets.Dataset` as dicts, image columns undecoded (`{"bytes", "path"}`).

    Read through the Arrow format: casting image columns to `decode=False` would
    rewrite the whole dataset, images included, into a new cache file.
    """

    def __init__(self, ds):
        self.ds = ds.with_format("arrow")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i].to_pylist()[0]


def reads_as_json(spec: DatasetSpec) -> bool:
    """True when this module's JSON reader reads the dataset (.json / .jsonl in either layout), False for `datasets`."""
    if spec.format == "hf":
        return False
    return Path(spec.path).suffix in (".json", ".jsonl") or detect_format(spec) == "llava"


def read_records(spec: DatasetSpec):
    """The records of one dataset: a `RecordStore` for .json / .jsonl, a `datasets.Dataset` otherwise."""
    return read_llava(spec.path) if reads_as_json(spec) else read_hf(spec.path, spec.split)


def iter_hf(ds, batch_size: int = 1000, image_columns: tuple[str, ...] = ("images", "image")) -> Iterator[dict]:
    """Rows of an HF dataset with image columns as references: a path, or `EMBEDDED` when stored inline."""
    image_cols = [c for c in image_columns if c in ds.column_names]
    for table in ds.with_format("arrow").iter(batch_size=batch_size):
        rest = table.drop_columns(image_cols).to_pylist()
        refs = {c: _image_refs(table.column(c).combine_chunks()) for c in image_cols}
        for r, row in enumerate(rest):
            row.update({c: refs[c][r] for c in image_cols})
            yield row


def _image_refs(col) -> list:
    """Per row: an image reference, or a list of them, read without touching image bytes."""
    import pyarrow as pa

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        flat = _scalar_refs(col.flatten())
        offsets = col.offsets.to_pylist()
        offsets = [o - offsets[0] for o in offsets]  # a sliced array keeps its parent's offsets; flatten() does not
        valid = col.is_valid().to_pylist()
        return [flat[offsets[r] : offsets[r + 1]] if valid[r] else None for r in range(len(col))]
    return _scalar_refs(col)


def _scalar_refs(col) -> list:
    import pyarrow as pa

    if pa.types.is_struct(col.type):
        has_bytes = col.field("bytes").is_valid().to_pylist() if col.type.get_field_index("bytes") >= 0 else [False] * len(col)
        paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * len(col)
        present = col.is_valid().to_pylist()
        return [None if not ok else (EMBEDDED if b else p) for ok, b, p in zip(present, has_bytes, paths)]
    return col.to_pylist()
