"""Deterministic, learnable synthetic token stream for language-model benchmarks and tests.

Each sequence walks one fixed random cycle through the vocabulary (token a is followed by
next(a)); with probability `noise` a position instead jumps to a uniformly random token and
the walk continues from there. A model has to learn the bigram table next(.), so the loss falls
from ln(vocab) towards about H(noise) + noise * ln(vocab) (0.95 nats at noise=0.1, vocab=512).
The walk has a closed form (no Python loop over positions): a batch costs a few vectorised ops.
"""
from __future__ import annotations

import torch

_MIX = (1_000_003, 10_007)


class SyntheticTokens:
    def __init__(self, vocab_size: int, block_size: int, seed: int = 0, noise: float = 0.1,
                 pin_memory: bool = False):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.seed, self.noise = seed, noise
        # Pinned host memory lets `.to(device, non_blocking=True)` overlap the copy with compute;
        # it needs a CUDA runtime, so the flag is a no-op on CPU-only machines.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        g = torch.Generator().manual_seed(seed)
        self.cycle = torch.randperm(vocab_size, generator=g)  # cycle[i] -> cycle[i + 1]
        self.where = torch.empty_like(self.cycle)
        self.where[self.cycle] = torch.arange(vocab_size)  # token -> its index in the cycle

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s rows of global batch `step`: (x, y) int64 of shape
        (batch_size // world_size, block_size), y[:, t] = x[:, t + 1] within the stream.

        A pure function of (seed, step) for the global batch, so a resumed run sees exactly the
        batches an uninterrupted one would, and the global batch does not depend on world_size.
        """
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size % world_size == 0 and 0 <= rank < world_size, "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        per_rank, n = batch_size // world_size, self.block_size + 1
        g = torch.Generator().manual_seed((self.seed * _MIX[0] + step * _MIX[1]) % (2**63 - 1))
        # Draw for the whole global batch, then slice: every rank consumes the same random stream.
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        jump = (torch.rand(batch_size, n, generator=g) < self.noise)[rows]
        start = torch.randint(self.vocab_size, (batch_size, n), generator=g)[rows]
        jump[:, 0] = True
        t = torch.arange(n).expand(per_rank, n)
        last_jump = torch.where(jump, t, 0).cummax(dim=1).values
        # A walk that jumped to token s at position j is at cycle[where[s] + (t - j)] at t.
        idx = (self.where[start.gather(1, last_jump)] + t - last_jump) % self.vocab_size
        seq = self.cycle[idx]
        x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device | str,
              ) -> tuple[torch.Tensor, ...]:
    """Copy a batch to `device`; asynchronous when the source tensors are pinned."""
    return tuple(t.to(device, non_blocking=True) for t in batch)
