"""Read and write sharded safetensors checkpoints a piece at a time.

:class:`ShardedSource` reads the tensors of a Hugging Face checkpoint folder (``model.safetensors`` or
``model.safetensors.index.json`` with its shards) by name, through ``safetensors.safe_open`` memory maps that
are closed again after every read, so pages touched for one block do not stay resident for the next.

:class:`ShardedWriter` writes a sharded checkpoint into a temporary folder next to the destination: whole
shards from tensors in memory, or tensors copied from a source in row chunks (an embedding never has to be in
memory at once). :meth:`ShardedWriter.commit` adds ``model.safetensors.index.json`` and renames the folder
into place; leaving the ``with`` block any other way removes it, so the destination is complete or absent.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from secateurs.backends.files import make_parents, publish, remove_made, replace_into
from secateurs.errors import CheckpointError

__all__ = ["INDEX", "ShardedSource", "ShardedWriter", "TensorInfo", "check_shapes", "shard_name"]

INDEX = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard file name: ``model-00001-of-00004.safetensors`` (``index`` counts from 1)."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class TensorInfo:
    """Shape, dtype and file of one stored tensor (read from the file header, no data loaded)."""

    __slots__ = ("dtype", "file", "shape")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.file, self.dtype, self.shape = file, dtype, shape

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 << 20:
                raise CheckpointError(f"'{path}' is not a safetensors file (header size {size})")
            header: dict[str, Any] = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, meta in header.items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(meta.get("dtype"), str)):
            raise CheckpointError(f"'{path}': the header entry of tensor '{name}' is malformed (needs a dtype, a shape "
                                  f"of sizes >= 0 and two data offsets): {str(meta)[:120]}")
    return header


def read_index(folder: Path) -> dict[str, str]:
    """The weight map of ``folder``'s ``model.safetensors.index.json``, every shard a file inside ``folder``.

    Raises:
        CheckpointError: The index is not valid JSON, has no string-to-string ``weight_map``, or names a shard
            outside the folder (an absolute path, ``..``, a link leading out).

    """
    index = folder / INDEX
    try:
        data = json.loads(index.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"'{index}' is not a valid safetensors index: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"'{index}' is not a valid safetensors index: 'weight_map' must map tensor names to "
                              "file names")
    root = folder.resolve()
    for name, shard in weight_map.items():
        # the shard's folder must be the checkpoint's; the file itself may be a link (the Hugging Face cache links
        # snapshots/<rev>/*.safetensors into blobs/)
        if Path(shard).is_absolute() or ".." in Path(shard).parts or (folder / shard).parent.resolve() != root:
            raise CheckpointError(f"'{index}': tensor '{name}' is in '{shard}', which is not a file inside the "
                                  "checkpoint folder; refused")
    return weight_map


def check_shapes(source: ShardedSource, expected: dict[str, tuple[int, ...]], config: Path, hint: str = "") -> None:
    """Refuse stored tensors whose shapes differ from the ones ``config`` builds (``expected``; others are not read).

    Raises:
        CheckpointError: The first such tensor, named with both shapes (and ``hint``).

    """
    for name, shape in expected.items():
        if name in source and tuple(source.info(name).shape) != tuple(shape):
            raise CheckpointError(f"'{config}' does not match the weights: '{name}' is stored as "
                                  f"{list(source.info(name).shape)}, the config builds {list(shape)}{hint}")


class ShardedSource:
    """The tensors of a safetensors checkpoint folder, read by name without loading the rest."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        """Index ``folder``'s tensors (headers only).

        Raises:
            CheckpointError: No safetensors weights, an index naming missing files, or an unreadable header.

        """
        self.folder = Path(folder)
        index = self.folder / INDEX
        single = self.folder / "model.safetensors"
        if index.is_file():
            files = sorted({self.folder / f for f in read_index(self.folder).values()})
        elif single.is_file():
            files = [single]
        else:
            raise CheckpointError(f"no model.safetensors or {INDEX} in '{self.folder}'")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"shard '{path}' named by '{index}' is missing")
            for name, meta in _header(path).items():
                dtype = _DTYPES.get(meta.get("dtype", ""))
                if dtype is None:
                    raise CheckpointError(f"tensor '{name}' in '{path}' has unsupported dtype {meta.get('dtype')!r}")
                self.tensors[name] = TensorInfo(path, dtype, tuple(meta["shape"]))

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` is stored, its shape and dtype.

        Raises:
            CheckpointError: The checkpoint has no such tensor.

        """
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint in '{self.folder}' has no tensor '{name}'") from None

    @contextlib.contextmanager
    def _open(self, path: Path) -> Iterator[Any]:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from exc
        try:
            yield handle
        finally:
            del handle  # unmaps the file: the pages read stay in the page cache, not in this process

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` (copied out of the memory maps, which are closed again)."""
        return self._read({name: self.info(name) for name in names})

    def _read(self, infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
        """The stored tensors ``infos`` names, one file opened at a time."""
        by_file: dict[Path, list[str]] = {}
        for name, info in infos.items():
            by_file.setdefault(info.file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with self._open(path) as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the 2-D tensor ``name`` (an embedding lookup without loading the embedding)."""
        info = self.info(name)
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if len(info.shape) != 2 or (unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= info.shape[0])):
            raise CheckpointError(f"cannot look up ids {int(unique[0])}..{int(unique[-1])} in '{name}' {info.shape}")
        with self._open(info.file) as f:
            table = f.get_slice(name)
            picked = torch.cat([table[int(i):int(i) + 1] for i in unique]) if unique.numel() else torch.empty(
                0, info.shape[1], dtype=info.dtype)
        return picked[inverse].reshape(*ids.shape, info.shape[1])

    def chunks(self, name: str, max_bytes: int) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as consecutive slices along its first dim of at most ``max_bytes`` each (one for scalars)."""
        info = self.info(name)
        if not info.shape or info.nbytes <= max_bytes:
            yield self.load([name])[name]
            return
        rows = info.shape[0]
        step = max(1, max_bytes // max(1, info.nbytes // rows))
        for start in range(0, rows, step):
            with self._open(info.file) as f:
                yield f.get_slice(name)[start:min(start + step, rows)]


Chunks = Callable[[], Iterable[torch.Tensor]]


def _single(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


class ShardedWriter:
    """A sharded safetensors checkpoint written into a temporary folder and renamed into place on commit.

    Use as a context manager: leaving it without :meth:`commit` (an exception, an interrupt) removes the
    temporary folder, so ``path`` is either complete or untouched.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False, enabled: bool = True) -> None:
        """Prepare to write ``path``.

        Args:
            path: The destination folder; must not exist unless ``overwrite``.
            overwrite: Replace an existing folder (removed only once the new one is complete).
            enabled: False on ranks that must not write (every method then does nothing).

        Raises:
            CheckpointError: ``path`` exists.

        """
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists() and not overwrite:
            raise CheckpointError(f"output folder '{self.path}' exists; pass overwrite=True to replace it")
        self.tmp: Path | None = None
        self.made: list[Path] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def __enter__(self) -> ShardedWriter:
        if self.enabled:
            self.made = make_parents(self.path)
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
            except OSError as exc:
                remove_made(self.made)
                raise CheckpointError(f"cannot write into '{self.path.parent}': {exc}") from exc
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp is not None:  # not committed
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            remove_made(self.made)

    @property
    def folder(self) -> Path | None:
        """The temporary folder files go to before the commit (None when disabled)."""
        return self.tmp

    def write_shard(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (in memory) as one shard file."""
        self.stream_shard(filename, [(n, t.dtype, tuple(t.shape), functools.partial(_single, t))
                                     for n, t in tensors.items()])

    def rewrite_shard(self, filename: str, convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        """Replace the written shard ``filename`` by ``convert`` of its tensors (before the commit)."""
        if self.tmp is None:
            return
        from safetensors.torch import load_file

        tensors = {k: v.clone() for k, v in load_file(str(self.tmp / filename)).items()}  # the file is replaced
        for name, t in tensors.items():
            del self.weight_map[name]
            self.total_bytes -= t.numel() * t.element_size()
        self.write_shard(filename, convert(tensors))

    def stream_shard(self, filename: str, items: list[tuple[str, torch.dtype, tuple[int, ...], Chunks]]) -> None:
        """Write one shard whose tensors arrive in pieces: ``(name, dtype, shape, chunks)``.

        ``chunks()`` yields the tensor's data in order (slices along the first dim); only one piece is in
        memory at a time.

        Raises:
            CheckpointError: A tensor's pieces do not add up to its shape, or the disk write failed.

        """
        if self.tmp is None:
            return
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, _ in items:
            if dtype not in _NAMES:
                raise CheckpointError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        target = self.tmp / filename
        try:
            with open(target, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                for name, dtype, _, chunks in items:
                    begin, end = header[name]["data_offsets"]
                    written = 0
                    for piece in chunks():
                        if piece.dtype != dtype:
                            raise CheckpointError(f"tensor '{name}' changed dtype while written: {piece.dtype}")
                        data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                        f.write(data.data)
                        written += data.nbytes
                    if written != end - begin:
                        raise CheckpointError(f"tensor '{name}' has {written} bytes, its shape needs {end - begin}")
                    self.weight_map[name] = filename
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise CheckpointError(f"writing '{target}' failed: {exc}") from exc
        self.total_bytes += offset

    def commit(self, files: Callable[[Path], Any] | None = None) -> Path:
        """Write the index, let ``files`` add the rest (config, manifest), and rename the folder into place.

        Raises:
            CheckpointError: Writing or renaming failed; nothing is left behind then.

        """
        if self.tmp is None:
            return self.path
        try:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2))
            if files is not None:
                files(self.tmp)
            publish(self.tmp)  # mkdtemp made it owner-only; a served model must stay readable
            replace_into(self.tmp, self.path)
        except OSError as exc:
            raise CheckpointError(f"writing '{self.path}' failed, nothing was written: {exc}") from exc
        self.tmp = None
        return self.path
