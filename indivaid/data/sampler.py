"""P x K identity sampler: P identities, K images each, per global batch.

Identity-balanced like the references' ``RandomIdentitySampler``: each epoch every identity's
images are shuffled and cut into K-chunks (an identity with fewer than K images is drawn with
replacement up to K; leftover images short of a chunk are dropped), and each batch takes the next
chunk of P identities drawn *uniformly* from those with chunks left, so an identity with many
images is not favoured over one with few. The batch list is a pure function of (labels, seed,
epoch), so every DDP rank computes the same global list.

Under DDP one global batch is split across the ranks, as CLIP-ReID's distributed sampler does:
rank r takes the r-th block of P/world identities of every global batch, so the batch size the
learning rate was tuned for and the optimiser steps per epoch stay those of one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def identity_chunks(members: list[np.ndarray], k: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Each identity's shuffled images cut into K-chunks (drawn with replacement below K images)."""
    chunks = []
    for idx in members:
        pick = rng.choice(idx, k, replace=True) if len(idx) < k else rng.permutation(idx)
        usable = len(pick) - len(pick) % k
        chunks.append(list(pick[:usable].reshape(-1, k)))
    return chunks


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s block of a global batch laid out identity by identity (P/world x K images)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


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
        if p % world_size:
            raise ValueError(f"batch_p={p} identities per global batch cannot be split evenly over {world_size} "
                             f"DDP workers; set stage1.batch_p and stage2.batch_p to multiples of {world_size} "
                             "(or use another worker count)")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.labels = labels
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self.members = np.split(order, bounds[:-1])
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """Images per step on this rank: P/world identities x K."""
        return self.p // self.world_size * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All global batches of an epoch (P*K indices, identity by identity), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        chunks = identity_chunks(self.members, self.k, rng)
        remaining = np.array([len(c) for c in chunks])
        batches = []
        while (remaining > 0).sum() >= self.p:
            chosen = rng.choice(np.flatnonzero(remaining > 0), self.p, replace=False)  # uniform over identities
            batches.append(np.concatenate([chunks[i][len(chunks[i]) - remaining[i]] for i in chosen]))
            remaining[chosen] -= 1
        return batches

    def __iter__(self) -> Iterator[np.ndarray]:
        """This rank's share of every global batch: as many steps as one process takes."""
        return iter([rank_share(b, self.rank, self.world_size) for b in self.global_batches()])

    def __len__(self) -> int:
        return len(self.global_batches())
