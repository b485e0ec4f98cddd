"""Activation sources for the trainer.

* ``InMemoryActivations(data, target=None)``: a ``[T, d]`` tensor, reshuffled every epoch.
* ``ShardedActivations(path)``: ``.npy`` / ``.safetensors`` shards in a folder (or one file),
  memory-mapped and streamed with bounded RAM: each epoch visits the shards' fixed-size chunks
  in a shuffled order, loads ``chunks_per_buffer`` of them at a time and shuffles the rows of
  that buffer, so RAM holds one buffer (``buffer_rows`` rows), whatever the data size.

Both are deterministic functions of (seed, position): ``state()`` / ``load_state()`` give the
trainer's checkpoints an exact data position to resume from. ``load_activations`` reads
everything into one tensor (small data, tests). A safetensors shard holds one tensor, or one
named ``activations``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

_SUFFIXES = (".npy", ".safetensors")


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class _Shard:
    """One memory-mapped file: ``rows``, ``width`` and ``read(start, stop)`` as float32."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".npy":
            import numpy as np

            try:
                self._array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"activations: {path} is not a plain .npy array: {e}") from None
            shape, kind = self._array.shape, self._array.dtype.kind
            floating = kind == "f"
        elif path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._file = safe_open(str(path), framework="pt")
                keys = list(self._file.keys())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"activations: {path} is not a readable safetensors file: {e}") from None
            if "activations" in keys:
                self._key = "activations"
            elif len(keys) == 1:
                self._key = keys[0]
            else:
                raise ValueError(f"activations: {path} holds {sorted(keys)}; name the tensor 'activations'")
            sl = self._file.get_slice(self._key)
            shape = tuple(sl.get_shape())
            floating = sl.get_dtype() in ("F16", "BF16", "F32", "F64")
        else:
            raise ValueError(f"activations: {path}: expected a .npy or .safetensors file")
        if len(shape) != 2 or not floating:
            raise ValueError(f"activations: {path} must hold a 2-D float array [tokens, d], got shape {tuple(shape)}")
        self.rows, self.width = int(shape[0]), int(shape[1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.array(self._array[start:stop], dtype=np.float32))
        return self._file.get_slice(self._key)[start:stop].float()


def _shards(path) -> list[_Shard]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
        if not files:
            raise FileNotFoundError(f"activations: no .npy or .safetensors files in {path}")
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"activations: {path} not found")
    shards = [_Shard(f) for f in files]
    widths = {s.width for s in shards}
    if len(widths) != 1:
        raise ValueError(f"activations: shards in {path} have different widths {sorted(widths)}")
    return shards


def load_activations(path) -> torch.Tensor:
    """Every row of a file or folder of shards, as one float32 [T, d] tensor."""
    return torch.cat([s.read(0, s.rows) for s in _shards(path)])


class InMemoryActivations:
    def __init__(self, data: torch.Tensor, target: Optional[torch.Tensor] = None, *, seed: int = 0):
        if data.dim() != 2:
            raise ValueError(f"activations must be [T, d], got {tuple(data.shape)}")
        if target is not None and target.shape[0] != data.shape[0]:
            raise ValueError(f"target has {target.shape[0]} rows for {data.shape[0]} activations")
        self.data, self.target, self.seed = data, target, seed
        self.width = data.shape[1]
        self.epoch, self.pos = 0, 0
        self._order = None

    def __len__(self):
        return self.data.shape[0]

    def sample_for_init(self, rows: int = 65536) -> torch.Tensor:
        src = self.data if self.target is None else self.target
        return src[:rows]

    def next_batch(self, batch_size: int):
        """(x, y or None) of ``batch_size`` rows; an epoch's leftover rows are skipped."""
        n = self.data.shape[0]
        if batch_size > n:
            raise ValueError(f"{n} activations are fewer than one batch of {batch_size}")
        if self.pos + batch_size > n:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        idx = self._order[self.pos:self.pos + batch_size]
        self.pos += batch_size
        return self.data[idx], None if self.target is None else self.target[idx]

    def state(self) -> dict:
        return dict(kind="in_memory", epoch=self.epoch, pos=self.pos)

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


_EPOCHS_TO_TRY = 10


class _BufferedSource:
    """Rows served from shuffled buffers: epoch -> groups (``_load_group``) -> batches. The
    leftover rows of a buffer are skipped; state = (epoch, group, pos) resumes exactly."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch, self.group, self.pos = 0, 0, 0
        self._buffer = None

    def _num_groups(self) -> int:
        raise NotImplementedError

    def _group_rows(self) -> torch.Tensor:
        raise NotImplementedError

    def _load_group(self) -> torch.Tensor:
        rows = self._group_rows()
        return rows[torch.randperm(rows.shape[0], generator=_generator(self.seed, self.epoch, self.group + 1))]

    def _max_buffer_rows(self) -> int:
        """The most rows one buffer can hold (its largest possible group)."""
        raise NotImplementedError

    def next_batch(self, batch_size: int):
        if batch_size > len(self):
            raise ValueError(f"{len(self)} activations are fewer than one batch of {batch_size}")
        largest = self._max_buffer_rows()
        if batch_size > largest:
            raise ValueError(f"no buffer can hold a batch of {batch_size} rows (at most {largest}); "
                             "raise the buffer size or use a smaller batch")
        groups = self._num_groups()
        # which chunks share a buffer changes every epoch: a batch near the largest buffer may
        # need several epochs to meet a buffer that holds it
        for _ in range(_EPOCHS_TO_TRY * groups + 2):
            if self._buffer is None:
                self._buffer = self._load_group()
            if self.pos + batch_size <= self._buffer.shape[0]:
                x = self._buffer[self.pos:self.pos + batch_size]
                self.pos += batch_size
                return x, None
            self._buffer, self.pos = None, 0
            self.group += 1
            if self.group >= groups:
                self.epoch, self.group = self.epoch + 1, 0
        raise ValueError(f"in {_EPOCHS_TO_TRY} epochs no buffer held a batch of {batch_size} rows (short chunks at the "
                         "ends of shards make some buffers smaller); raise the buffer size or use a smaller batch")

    def state(self) -> dict:
        return dict(kind=type(self).__name__, epoch=self.epoch, group=self.group, pos=self.pos)

    def load_state(self, state: dict) -> None:
        self.epoch, self.group, self.pos, self._buffer = state["epoch"], state["group"], state["pos"], None


class ShardedActivations(_BufferedSource):
    def __init__(self, path, *, seed: int = 0, chunk_rows: int = 4096, chunks_per_buffer: int = 16):
        super().__init__(seed)
        for name, v in (("chunk_rows", chunk_rows), ("chunks_per_buffer", chunks_per_buffer)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ShardedActivations: {name} must be a positive int, got {v!r}")
        self.shards = _shards(path)
        self.width = self.shards[0].width
        self.chunk_rows, self.chunks_per_buffer = chunk_rows, chunks_per_buffer
        self.chunks = [(i, s0) for i, s in enumerate(self.shards) for s0 in range(0, s.rows, chunk_rows)]
        if not self.chunks:
            raise ValueError(f"activations: {path} holds no rows (every file is [0, d])")
        self._largest_buffer = None

    def __len__(self):
        return sum(s.rows for s in self.shards)

    @property
    def buffer_rows(self) -> int:
        return self.chunk_rows * self.chunks_per_buffer

    def _max_buffer_rows(self) -> int:
        if self._largest_buffer is None:  # once: next_batch asks every step, the layout is fixed
            sizes = sorted((min(self.chunk_rows, self.shards[i].rows - s0) for i, s0 in self.chunks), reverse=True)
            self._largest_buffer = sum(sizes[:self.chunks_per_buffer])
        return self._largest_buffer

    def sample_for_init(self, rows: int = 65536) -> torch.Tensor:
        out, have = [], 0
        for s in self.shards:
            take = min(s.rows, rows - have)
            out.append(s.read(0, take))
            have += take
            if have >= rows:
                break
        return torch.cat(out)

    def _num_groups(self) -> int:
        return -(-len(self.chunks) // self.chunks_per_buffer)

    def _group_rows(self) -> torch.Tensor:
        order = torch.randperm(len(self.chunks), generator=_generator(self.seed, self.epoch)).tolist()
        picked = order[self.group * self.chunks_per_buffer:(self.group + 1) * self.chunks_per_buffer]
        parts = []
        for c in picked:
            shard, start = self.chunks[c]
            parts.append(self.shards[shard].read(start, min(start + self.chunk_rows, self.shards[shard].rows)))
        return torch.cat(parts)

    def next_batch(self, batch_size: int):
        if batch_size > self.buffer_rows:
            raise ValueError(f"batch of {batch_size} rows exceeds the buffer of {self.buffer_rows} "
                             "(raise chunk_rows or chunks_per_buffer)")
        return super().next_batch(batch_size)
