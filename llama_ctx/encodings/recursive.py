"""FLOATER-style recurrent positions (Liu et al. 2020, "Learning to Encode Position for Transformer with Continuous
Dynamical Model"), discretised: p_0 is learned and p_{k+1} = p_k + f(p_k) with a small learned MLP
f(p) = W2 tanh(W1 p + b1) + b2 (one Euler step of FLOATER's ODE per position). p_pos is added to the input
embedding at position `pos`; rotary off.

Cost: the recurrence is unrolled over positions, max(position_ids) + 1 sequential steps per forward (each a
[hidden x width] and a [width x hidden] product), and backpropagated through all of them when training. Inference
without gradients keeps the unrolled positions and only extends them (exact: the recurrence is Markov), as long as
the parameters hold the same values (compared element-wise on each call); see docs/encodings.md for measured times.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import check_int, check_number, register
from .base import EMBEDDING_SIDE_ATTENTION, PositionMethod, attach, encode_embeddings, rotary_off


@dataclass
class RecursiveParams:
    """Args:
    width: hidden units of f, >= 1.
    step: initial size of one step: W2 is drawn with standard deviation step / sqrt(width), so consecutive
        positions start about `step` apart per channel, > 0.
    seed: seeds the initial parameters (patching is deterministic; trained values are saved with the model).
    """

    width: int = 64
    step: float = 0.01
    seed: int = 0

    def __post_init__(self):
        self.width = check_int("width", self.width)
        self.step = check_number("step", self.step, gt=0)
        self.seed = check_int("seed", self.seed, ge=0)


class Recurrence(nn.Module):
    """p_0 and f's weights; `positions(n)` unrolls p_0 .. p_{n-1} (float32, whatever the parameters' dtype)."""

    def __init__(self, hidden: int, p: RecursiveParams):
        super().__init__()
        g = torch.Generator().manual_seed(p.seed)
        self.start = nn.Parameter(torch.randn(hidden, generator=g) * 0.02)  # LLaMA's embedding scale
        self.w1 = nn.Parameter(torch.randn(p.width, hidden, generator=g) / hidden**0.5)  # tanh inputs ~ |p|
        self.b1 = nn.Parameter(torch.rand(p.width, generator=g) * 2 - 1)
        self.w2 = nn.Parameter(torch.randn(hidden, p.width, generator=g) * p.step / p.width**0.5)
        self.b2 = nn.Parameter(torch.zeros(hidden))
        self._kept = None  # (parameter versions, unrolled positions) for inference

    def step(self, pos: torch.Tensor, w) -> torch.Tensor:
        w1, b1, w2, b2 = w
        return pos + torch.tanh(pos @ w1.T + b1) @ w2.T + b2

    def positions(self, n: int) -> torch.Tensor:
        w = [t.float() for t in (self.w1, self.b1, self.w2, self.b2)]
        rows = [self.start.float()]
        if not torch.is_grad_enabled():
            kept = self._kept
            if kept is not None and self._same(kept[0]):
                if kept[1].shape[0] >= n:
                    return kept[1][:n]
                rows = list(kept[1])
        while len(rows) < n:
            rows.append(self.step(rows[-1], w))
        table = torch.stack(rows)
        if not torch.is_grad_enabled():
            # a copy of the values, not (data_ptr, _version): an edit through `.data` (hand edits, old-style
            # optimizers) has its own version counter and would leave stale positions (the parameters are small)
            self._kept = ([t.detach().clone() for t in self.parameters()], table)
        return table

    def _same(self, values) -> bool:
        """Whether the parameters still hold `values` (dtype, device and every element)."""
        return all(a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
                   for a, b in zip(values, self.parameters()))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """p at `position_ids` (called, so that a PEFT `modules_to_save` wrapper hands it to its trained copy)."""
        if int(position_ids.min()) < 0:
            raise ConfigError(f"recursive: negative position {int(position_ids.min())}; positions start at 0")
        return self.positions(int(position_ids.max()) + 1)[position_ids]

    def __getstate__(self):  # deepcopy and pickle go through here: a copy recomputes the kept positions
        state = dict(super().__getstate__())
        state["_kept"] = None
        return state


class Recursive(PositionMethod):
    compatible_attention = EMBEDDING_SIDE_ATTENTION

    def apply(self, patcher, model, backbone, params) -> None:
        emb = backbone.embed_tokens.weight
        rotary_off(patcher, backbone)
        attach(patcher, backbone, Recurrence(emb.shape[-1], params).to(emb.dtype))
        encode_embeddings(patcher, backbone, self, params)

    def encode(self, fwd, embeds, position_ids):
        return embeds + fwd.module(position_ids).to(embeds.dtype)


register("recursive", "position", RecursiveParams, Recursive(),
         "rotary off, learned recurrent positions p_{k+1} = p_k + f(p_k) added to the embeddings (unrolled)")
