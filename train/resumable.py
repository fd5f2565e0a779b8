"""A resumable, rank-sharded batch iterator over a map-style dataset (the reference data iterator).

Global order: epoch ``e`` visits a permutation of the dataset drawn from a generator seeded with
``(seed, e)``. Each step consumes ``world_size * batch_size`` consecutive entries of it (the last
partial step of an epoch is dropped); rank ``r`` takes entries ``[r*B, (r+1)*B)`` of that block. The
checkpointed state is the *global* position (epoch, samples consumed in it), so it does not depend
on the number of ranks: a run resumed on another world size continues the same global stream (with
the same global batch).

Exactness: with ``num_workers=0`` samples are loaded in this process, and augmentation drawing from
the global RNGs (restored by the trainer) resumes bit-for-bit. With workers, the order of samples is
still exact, but worker RNG streams restart at the resume point (seeded from the position). A
dataset with ``keyed = True`` is indexed by ``(epoch, index)`` instead and seeds its own randomness
from that key (``train.data.WindowDataset``), which makes resume exact with any number of workers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class ResumableLoader:
    """Infinite iterator of collated batches for this rank; ``state_dict`` records the position."""

    def __init__(
        self,
        dataset: Dataset | Sequence,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        collate_fn: Optional[Callable[[list], Any]] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"ResumableLoader: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableLoader: rank {rank} outside world size {world_size}")
        n = len(dataset)  # type: ignore[arg-type]
        if n < batch_size * world_size:
            raise ValueError(f"ResumableLoader: dataset of {n} samples is smaller than one global batch ({world_size} ranks x {batch_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.collate_fn = collate_fn or default_collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together
        self._perm: Optional[tuple[int, torch.Tensor]] = None
        self._worker_iter: Optional[Iterator[Any]] = None

    # --- global order -----------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # type: ignore[arg-type]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.dataset)  # type: ignore[arg-type]
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g)
            else:
                perm = torch.arange(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def _advance(self) -> list[int]:
        """This rank's indices for the next step; moves the global position on."""
        if self.consumed + self.global_batch > len(self.dataset):  # type: ignore[arg-type]
            self.epoch, self.consumed = self.epoch + 1, 0
        start = self.consumed + self.rank * self.batch_size
        indices = self._permutation(self.epoch)[start : start + self.batch_size].tolist()
        self.consumed += self.global_batch
        if getattr(self.dataset, "keyed", False):
            # Keyed datasets draw per-sample randomness from (epoch, index): exact resume with workers too.
            return [(self.epoch, i) for i in indices]  # type: ignore[misc]
        return indices

    def _index_stream(self, epoch: int, consumed: int) -> Iterator[list[int]]:
        shadow = ResumableLoader.__new__(ResumableLoader)
        shadow.__dict__.update(self.__dict__)
        shadow.epoch, shadow.consumed, shadow._perm, shadow._worker_iter = epoch, consumed, None, None
        while True:
            yield shadow._advance()

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Any:
        if self.num_workers == 0:
            return self.collate_fn([self.dataset[i] for i in self._advance()])
        if self._worker_iter is None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.consumed, self.rank)) % (2**62))
            loader = DataLoader(
                self.dataset,  # type: ignore[arg-type]
                batch_sampler=self._index_stream(self.epoch, self.consumed),  # type: ignore[arg-type]
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                pin_memory=self.pin_memory,
                generator=g,
            )
            self._worker_iter = iter(loader)
        batch = next(self._worker_iter)
        self._advance()  # the workers run ahead; the checkpointed position is what was handed out
        return batch

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch, "dataset_len": len(self.dataset)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "consumed", "seed", "global_batch", "dataset_len"):
            if key not in state:
                raise KeyError(f"ResumableLoader state: missing '{key}'")
        if state["seed"] != self.seed:
            raise ValueError(f"ResumableLoader state: data seed {state['seed']} differs from this run's {self.seed}")
        if state["dataset_len"] != len(self.dataset):  # type: ignore[arg-type]
            raise ValueError(f"ResumableLoader state: dataset had {state['dataset_len']} samples, now {len(self.dataset)}")  # type: ignore[arg-type]
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"ResumableLoader state: global batch was {state['global_batch']}, now {self.global_batch} "
                f"({self.world_size} ranks x {self.batch_size}); keep ranks x batch size constant to resume the stream"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._worker_iter = None
