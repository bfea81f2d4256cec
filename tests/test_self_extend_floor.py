"""Self-Extend when the neighbour window is not a multiple of the group size.

Every case in test_attention_positional.py has window % group_size == 0, where w - w // g and w - w / g agree;
here they do not (16 // 3 = 5, 16 / 3 = 5.33), so the shift of the outer query positions is checked against the
dense reference with its integer definition (the paper's Algorithm 1: shift = w - w // g).
"""

import pytest
import torch

import llama_ctx
from llama_ctx.reference.positional import TRAINED, position_matrix
from conftest import ids, tiny_model
from test_attention_positional import assert_matches_reference


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_self_extend_window_not_a_multiple_of_group_size(impl):
    p = dict(group_size=3, window=16)
    assert p["window"] % p["group_size"]  # the case the other tests do not reach
    length = 150  # <= (64 - 16) * 3 + 16 = 160 covered positions, far past the window and the trained length
    assert length > TRAINED
    rel, _ = position_matrix("self-extend", p, torch.arange(length))
    assert (rel == rel.round()).all()  # the reference only has integer relative positions
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, "self-extend", **p)
    assert_matches_reference(model, "self-extend", p, ids(length))
