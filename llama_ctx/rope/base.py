"""What every frequency method starts from: the model's unscaled RoPE frequencies.

A frequency method is a pure function `fn(params, spec, seq_len=None) -> (inv_freq, attention_scaling)`
(the transformers `_compute_<type>_parameters` shape): float32 `inv_freq` of shape `(dim // 2,)` and the
factor that cos/sin are multiplied by. `seq_len` is only read by dynamic methods.

A model can already scale its frequencies natively (`rope_parameters["rope_type"]` other than "default", e.g.
every Llama 3.1/3.2 checkpoint: "llama3", factor 8, 8K -> 128K). Frequency methods are defined on the unscaled
frequencies, so `patch()` refuses them on such a model unless told to replace the native scaling
(`replace_native=True`); `RopeSpec.unscaled` is then the model they start from.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class RopeSpec:
    """A model's rotary embedding as llama_ctx's methods see it.

    Args:
        base: `rope_theta`.
        dim: number of rotated channels per head (head_dim * partial_rotary_factor), even.
        trained_window: the context length the model handles as it is: with native scaling, the extended length
            (see `from_config`), else `original_max_position_embeddings` or `max_position_embeddings`.
        native: the model's own `rope_type`; "default" means no native scaling.
        base_window: the window the unscaled frequencies were trained on (`original_max_position_embeddings`,
            else `max_position_embeddings`); equals `trained_window` without native scaling.
        max_position_embeddings: the config's value (transformers' dynamic RoPE reads its window from it).
    """

    base: float
    dim: int
    trained_window: int
    native: str = "default"
    base_window: int | None = None  # None: trained_window
    max_position_embeddings: int | None = None  # None: trained_window

    @classmethod
    def from_config(cls, config) -> "RopeSpec":
        rp = dict(getattr(config, "rope_parameters", None) or {})
        base = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
        native = rp.get("rope_type", rp.get("type", "default"))
        max_pos = int(config.max_position_embeddings)
        base_window = int(rp.get("original_max_position_embeddings") or max_pos)
        window = base_window
        if native != "default":
            # The length the scaled model was extended to: max_position_embeddings (Llama 3.1: 131072), or
            # base window * factor where the config leaves max_position_embeddings at the base window (Qwen2.5's
            # yarn recipe, a linear-scaled model). Dynamic NTK scales past max_position_embeddings, which stays
            # its window.
            window = max_pos
            factor = rp.get("factor")
            if "dynamic" not in native and isinstance(factor, numbers.Real) and not isinstance(factor, bool):
                window = max(window, int(base_window * factor))
        return cls(float(base), dim, int(window), native, base_window, max_pos)

    @property
    def scaled(self) -> bool:
        """Whether the model scales its frequencies natively."""
        return self.native != "default"

    @property
    def length_dependent(self) -> bool:
        """Whether the native frequencies change with the input length."""
        return length_dependent(self.native)

    def unscaled(self) -> "RopeSpec":
        """The same model without its native scaling: what frequency methods start from."""
        window = self.base_window or self.trained_window
        return replace(self, trained_window=window, native="default", base_window=window)


def length_dependent(rope_type: str) -> bool:
    """Whether transformers recomputes this rope type's frequencies per call (its `dynamic_rope_update` rule)."""
    return "dynamic" in rope_type or rope_type == "longrope"


def default_inv_freq(spec: RopeSpec, base: float | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d), i = 0 .. d/2-1, in float32, computed as transformers does (so the two agree exactly)."""
    base = spec.base if base is None else base
    exponent = torch.arange(0, spec.dim, 2, dtype=torch.int64).to(torch.float32) / spec.dim
    return (1.0 / (base**exponent)).to(torch.float32)


def model_inv_freq(config, spec: RopeSpec) -> torch.Tensor:
    """The model's own float32 frequencies at load, native scaling included (transformers computes them)."""
    if not spec.scaled:
        return default_inv_freq(spec)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS[spec.native](config, None)
    return inv_freq.to(torch.float32)


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Tokens per full turn of each dimension pair: 2*pi/theta (inf where theta is 0)."""
    return 2 * torch.pi / inv_freq
