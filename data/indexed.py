"""Random access to a shard dataset: ``dataset[i]`` is the i-th clip, decoded and validated.

Training needs exact, resumable sample order (resume at step k must see the batches the
uninterrupted run saw), which a streaming shuffle buffer cannot give. The dataset's
``index.json`` already records every shard's sample count, so a global index maps to
(shard, position) without a scan; tar members are located with ``wids``' indexed tar reader.
Open shards are kept per process (DataLoader workers each open their own).
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path

from wids.wids import IndexedTarSamples

from data.shards import DatasetIndex, ShardError, decode_sample, read_index


class ShardDataset:
    """Map-style view of a dataset directory written by :class:`data.shards.ShardWriter`."""

    def __init__(self, root: str | os.PathLike, max_open: int = 8):
        self.index: DatasetIndex = read_index(root)
        self.root = Path(root)
        self.max_open = max_open
        self.frame_counts = [f for s in self.index.shards for f in s.frames]
        self._starts = []
        total = 0
        for s in self.index.shards:
            self._starts.append(total)
            total += s.num_samples
        self._len = total
        self._open: OrderedDict[int, IndexedTarSamples] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> IndexedTarSamples:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: never share file handles
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        path = self.index.shard_paths[s]
        try:
            reader = IndexedTarSamples(path=path, use_mmap=True)
        except Exception as exc:  # wids raises bare exceptions on truncated tars
            raise ShardError(path, "<tar>", f"cannot index shard: {exc}") from exc
        if len(reader) != self.index.shards[s].num_samples:
            raise ShardError(path, "<tar>", f"holds {len(reader)} samples, index.json says {self.index.shards[s].num_samples}")
        self._open[s] = reader
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return reader

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._len:
            raise IndexError(f"clip index {i} out of range for {self._len} clips in {self.root}")
        s = bisect.bisect_right(self._starts, i) - 1
        reader = self._shard(s)
        raw = {k.lstrip("."): (v.read() if hasattr(v, "read") else v) for k, v in reader[i - self._starts[s]].items()}
        raw["__url__"] = self.index.shard_paths[s]
        return decode_sample(raw)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # file handles do not cross process boundaries
        return state
