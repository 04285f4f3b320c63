"""Batches for the loop: an index plan per epoch (DistributedSampler order, so one process and N processes see the
same global batches), and two ways to materialise them: direct tensor indexing (no overhead; default) or a
DataLoader with worker processes, prefetching and pinned memory (`workers > 0`), where per-sample preprocessing
(`transform`) runs in the workers while the model trains on the current batch.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, *, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[torch.Tensor]:
    """This rank's batches (index tensors) for `epoch`. `batch_size` is per rank.

    The permutation depends only on (seed, epoch), never on a generator's running state, so a resumed run
    draws the same order as an uninterrupted one.
    """
    sampler = DistributedSampler(_Sized(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    return list(order.split(batch_size))


class _TensorPairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]):   # a whole batch in one indexing op
        x = self.x[idx]
        return (self.transform(x) if self.transform else x), self.y[idx]


def _identity(batch):
    return batch


def batch_iterator(x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor], *, workers: int = 0,
                   prefetch: int = 2, pin_memory: bool = False,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) per batch, in the order of `batches`."""
    if workers <= 0:
        for idx in batches:
            xb = x[idx]
            yield (transform(xb) if transform else xb), y[idx]
        return
    loader = DataLoader(_TensorPairs(x, y, transform), batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                        prefetch_factor=prefetch, pin_memory=pin_memory and torch.cuda.is_available(),
                        collate_fn=_identity, generator=torch.Generator().manual_seed(0))
    yield from loader
