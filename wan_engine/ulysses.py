"""Ulysses sequence parallelism: one DiT forward's token sequence split over the ranks of a group.

Each rank of a Ulysses group of size U holds a contiguous slice of ceil(L / U) tokens (the last slices padded
with zero tokens when U does not divide L) through the whole block stack. Only self-attention needs the other
tokens: q, k and v go together through one all-to-all from "my tokens, all heads" to "all tokens, my N / U
heads", attention runs, and a second all-to-all brings the output back to "my tokens, all heads". Norms, RoPE
(with the rank's true token positions), cross-attention and the FFN act per token and stay local. The padding
is sliced off the keys and values before attention, so no real token attends to it; the padded query rows are
dropped when the head's output is gathered back to the whole sequence.

The collectives are torch's functional collectives, which torch.compile captures in a full graph, so compiled
blocks keep working split. They take no timeout of their own: the group's timeout, set when the job's process
group is created (`wan_engine.parallel.init_job_group`), bounds every one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

# torch 2.13 renamed all_gather_tensor (now deprecated) to all_gather_single; older releases have only the first.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[n, ...] from each of the group's W ranks -> [W * n, ...] in rank order, on every rank."""
    return funcol.wait_tensor(_all_gather(x.contiguous(), 0, group))


@dataclass(frozen=True)
class Ulysses:
    """The Ulysses group of one rank: the ranks that split a forward's tokens between them."""

    group: dist.ProcessGroup
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> Ulysses:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def shard(self, tokens: int) -> SequenceShard:
        """This rank's part of a forward over `tokens` tokens."""
        return SequenceShard(self.group, self.rank, self.size, tokens)


@dataclass(frozen=True)
class SequenceShard:
    """One rank's slice of a sequence of `tokens` tokens split over a Ulysses group of `size` ranks."""

    group: dist.ProcessGroup
    rank: int
    size: int
    tokens: int

    @property
    def local(self) -> int:
        """Tokens per rank, padding included."""
        return math.ceil(self.tokens / self.size)

    @property
    def padded(self) -> int:
        return self.local * self.size

    def scatter(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of `x` along `dim` (length `tokens`), zero-padded at the sequence's end."""
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, self.padded - self.tokens]
        return F.pad(x, pad).narrow(dim, self.rank * self.local, self.local).contiguous()

    def gather(self, x: Tensor) -> Tensor:
        """[B, local, C] from every rank -> [B, tokens, C], the padding dropped."""
        B, Ls, C = x.shape
        parts = all_gather(x, self.group).view(self.size, B, Ls, C)  # [U, B, Ls, C]: rank j's tokens
        return parts.transpose(0, 1).reshape(B, self.padded, C)[:, :self.tokens]

    def to_heads(self, x: Tensor) -> Tensor:
        """[B, N, local, D] (my tokens, all heads) -> [B, N / size, padded, D] (all tokens, my heads)."""
        B, N, Ls, D = x.shape
        x = x.reshape(B, self.size, N // self.size, Ls, D).transpose(0, 1).contiguous()  # [U, B, N/U, Ls, D]
        x = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, self.group))  # chunk j: rank j's tokens
        return x.permute(1, 2, 0, 3, 4).reshape(B, N // self.size, self.padded, D)

    def to_tokens(self, x: Tensor) -> Tensor:
        """[B, N / size, padded, D] (all tokens, my heads) -> [B, N, local, D] (my tokens, all heads)."""
        B, n, _, D = x.shape
        x = x.reshape(B, n, self.size, self.local, D).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, n, Ls, D]
        x = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, self.group))  # chunk j: rank j's heads
        return x.transpose(0, 1).reshape(B, self.size * n, self.local, D)

    def attend(self, attention_fn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of the whole sequence from this rank's q, k, v [B, N, local, D] -> [B, N, local, D]."""
        if q.shape[1] % self.size:
            raise ValueError(f"Ulysses degree {self.size} does not divide the model's {q.shape[1]} heads")
        # one exchange for q, k and v together: a third of the collectives' fixed costs
        q, k, v = self.to_heads(torch.cat([q, k, v])).chunk(3)  # 3 x [B, N/U, padded, D]
        if self.padded != self.tokens:   # no real query may attend to the padding
            k, v = k[:, :, :self.tokens], v[:, :, :self.tokens]
        return self.to_tokens(attention_fn(q, k, v))
