"""P x K identity sampler: P identities, K images each, per batch.

An epoch visits every training image about once: each identity's images are shuffled, padded by
sampling with replacement to a multiple of K (identities with fewer than K images are drawn with
replacement) and cut into K-chunks; batches take chunks of P distinct identities. The batch list
is a pure function of (labels, seed, epoch), so every DDP rank computes the same list and takes
its own share (batches ``rank, rank + world, ...``, truncated to equal length).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PKSampler:
    def __init__(self, labels: np.ndarray, p: int, k: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("PKSampler needs a non-empty 1-D label array")
        ids, inverse = np.unique(labels, return_inverse=True)
        if len(ids) < p:
            raise ValueError(f"P x K sampling needs at least P={p} identities, the training split has {len(ids)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self.members = np.split(order, bounds[:-1])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All batches of an epoch (index arrays of length P*K), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        chunks: list[list[np.ndarray]] = []
        for idx in self.members:
            n = max(self.k, -(-len(idx) // self.k) * self.k)
            pick = rng.permutation(idx)
            if n > len(idx):
                pick = np.concatenate([pick, rng.choice(idx, n - len(idx), replace=True)])
            chunks.append(list(pick.reshape(-1, self.k)))
        batches = []
        remaining = np.array([len(c) for c in chunks])
        while (remaining > 0).sum() >= self.p:
            avail = np.flatnonzero(remaining > 0)
            chosen = rng.choice(avail, self.p, replace=False, p=remaining[avail] / remaining[avail].sum())
            batches.append(np.concatenate([chunks[i][remaining[i] - 1] for i in chosen]))
            remaining[chosen] -= 1
        return batches

    def __iter__(self) -> Iterator[np.ndarray]:
        batches = self.global_batches()
        n = len(batches) // self.world_size
        return iter(batches[self.rank : n * self.world_size : self.world_size])

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size
