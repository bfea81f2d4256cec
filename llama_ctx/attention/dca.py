"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models",
HKUNLP/ChunkLlama; Qwen2.5-1M serves 1M tokens with it, on top of YaRN).

The sequence is cut into chunks of s = chunk_size - local_window positions and every key j sits at position
j mod s, its place in its chunk. A query i sees

  * keys of its own chunk (i // s == j // s) from position i mod s: the ordinary distance i - j (intra-chunk);
  * keys of the previous chunk from position min(i mod s + s, chunk_size): the first `local_window` queries of a
    chunk keep their exact distance to the end of the previous chunk, later ones are capped (successive-chunk);
  * keys of every older chunk from position chunk_size (inter-chunk).

No relative distance exceeds chunk_size, which must be below the trained window T, so any length works. Inputs
no longer than s are exactly the stock model. Three branches of the position-rewriting engine; the cache stores
each key once, rotated at j mod s, and no branch re-rotates it, so a decode step reads the cache as it is.
"""

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import check_int, from_model, register
from .engine import Branch, PositionalAttention, Scheme


@dataclass
class DCAParams:
    """Args:
    chunk_size: the largest relative position used, local_window < chunk_size < training_length; default 3T/4.
    local_window: queries this close to the previous chunk keep exact distances to it, >= 0; default T/16.
    training_length: trained context length T; defaults to the model's.
    """

    chunk_size: int | None = None
    local_window: int | None = None
    training_length: int | None = from_model(help="trained window")

    def __post_init__(self):
        T = self.training_length = check_int("training_length", self.training_length, ge=2)
        if self.chunk_size is None:
            self.chunk_size = 3 * T // 4
        if self.local_window is None:
            self.local_window = T // 16
        self.chunk_size = check_int("chunk_size", self.chunk_size)
        self.local_window = check_int("local_window", self.local_window, ge=0)
        if self.chunk_size >= T:
            raise ConfigError(f"chunk_size must be < training_length {T} (relative positions reach chunk_size), got "
                              f"{self.chunk_size}; the paper uses 3/4 of it ({3 * T // 4}).")
        if self.local_window >= self.chunk_size:
            raise ConfigError(f"local_window must be < chunk_size {self.chunk_size} (chunks hold chunk_size - "
                              f"local_window positions), got {self.local_window}; the paper uses T/16 ({T // 16}).")


def chunk_start(i: torch.Tensor, s: int) -> torch.Tensor:
    """First position of the chunk of length s holding position i."""
    return torch.div(i, s, rounding_mode="floor") * s


class DualChunkAttention(PositionalAttention):
    def scheme(self, p: DCAParams, ctx) -> Scheme:
        c, s = p.chunk_size, p.chunk_size - p.local_window
        intra = Branch(lo=lambda i: chunk_start(i, s), hi=lambda i: i, q=lambda pos: torch.remainder(pos, s))
        successive = Branch(lo=lambda i: chunk_start(i, s) - s, hi=lambda i: chunk_start(i, s) - 1,
                            q=lambda pos: (torch.remainder(pos, s) + s).clamp(max=c))
        inter = Branch(hi=lambda i: chunk_start(i, s) - s - 1, q=lambda pos: torch.full_like(pos, c))
        return Scheme(keys=lambda pos: torch.remainder(pos, s), branches=(intra, successive, inter))


register("dca", "attention", DCAParams, DualChunkAttention(),
         "Dual Chunk Attention (ChunkLlama): intra-, successive- and inter-chunk positions, distances <= chunk_size")
