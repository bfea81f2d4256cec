"""The chunked loss, from `llama_ctx.train.loss` when present (branch s2), else from `_standins`; the data pipeline.

`llama_ctx.train.loss` is developed on its own branch; this is the single place that knows where to find it.
"""

from __future__ import annotations

from ..data import DataConfig, build  # noqa: F401
from ..data import steps_for_budget as steps_for_tokens  # noqa: F401

try:  # pragma: no cover - depends on whether branch s2 is merged
    from .loss import chunked_causal_lm_loss  # noqa: F401
except ImportError:
    from ._standins import chunked_causal_lm_loss  # noqa: F401
