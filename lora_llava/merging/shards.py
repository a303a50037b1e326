"""Safetensors checkpoints read and written one tensor at a time.

A merge must not hold a whole 13B model (26 GB in 16-bit) in memory. Reading
takes one tensor at a time with plain file reads. Writing streams: every output
tensor's name, dtype and shape are known before the first byte is written, so
each shard's header goes out first and the tensors follow one by one; memory
holds one tensor, never one shard. The format (8-byte little-endian header
length, a JSON header, then the raw little-endian bytes) is the one
https://github.com/huggingface/safetensors specifies; `safe_open` and
`from_pretrained` read these files back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError, describe

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint: its name, dtype and shape (no data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = "pytorch_model.bin" if any(folder.glob("pytorch_model*.bin")) else "no weights"
    raise ModelError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} ({found}); merging reads safetensors checkpoints")


class TensorFile:
    """A safetensors file read one tensor at a time with plain reads.

    `safe_open` memory-maps the file: every page a merge has read stays resident in the
    process until the file is closed, i.e. a whole multi-GB shard. Plain reads hold one tensor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "rb")  # closed by __exit__
        try:
            size = int.from_bytes(self.file.read(8), "little")
            header = json.loads(self.file.read(size))
            header.pop("__metadata__", None)
            self.entries = {k: (TORCH_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}
        except (ValueError, KeyError, TypeError) as e:
            self.file.close()
            raise ModelError(f"{self.path}: not a readable safetensors file ({describe(e)})") from None
        self.data_start = 8 + size

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def specs(self) -> list[TensorSpec]:
        """Every tensor's name, dtype and shape, in file order."""
        ordered = sorted(self.entries.items(), key=lambda kv: kv[1][2][0])
        return [TensorSpec(name, dtype, shape) for name, (dtype, shape, _) in ordered]

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        self.file.seek(self.data_start + begin)
        if self.file.readinto(buffer) != len(buffer):
            raise ModelError(f"{self.path}: truncated file (tensor {name})")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def read_specs(files: list[Path]) -> dict[Path, list[TensorSpec]]:
    """Names, dtypes and shapes of every tensor, per file, without reading any data."""
    out = {}
    for path in files:
        with TensorFile(path) as f:
            out[path] = f.specs()
    return out


def iter_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `names` of one file, loaded one at a time."""
    with TensorFile(path) as f:
        for name in names:
            yield name, f.get_tensor(name)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Cut `specs` (in order) into shards of at most `max_bytes` (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    """transformers' file names: model.safetensors, or model-0000k-of-0000n.safetensors."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


class ShardWriter:
    """Writes one safetensors file whose tensors are declared up front and then written in order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = list(specs)
        self.next = 0
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")  # closed by __exit__
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self.next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.path.name}: expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.file.write(data.view(torch.uint8).numpy().data)
        self.next += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None and self.next != len(self.specs):
            raise RuntimeError(f"{self.path.name}: {len(self.specs) - self.next} tensor(s) were never written")


def write_index(folder: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    """model.safetensors.index.json for a sharded checkpoint (nothing for a single file)."""
    if len(shards) == 1:
        return
    weight_map = {spec.name: name for shard, name in zip(shards, names) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
