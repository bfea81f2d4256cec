"""Causal-LM loss over long sequences without materialising the logits.

At 100K tokens x 32K vocabulary the float32 logits alone are 12.8 GB, more than the rest of a LoRA step. The loss
here applies the output layer to `chunk_size` positions at a time, turns each chunk's logits into a summed
cross-entropy and drops them; `torch.utils.checkpoint` recomputes them in backward, one chunk at a time. The peak is
then one chunk's logits and their gradient (about 16 * chunk_size * vocab bytes: 2 GB at 4096 x 32K), whatever the
length.

Semantics are transformers' `ForCausalLMLoss`: logits[t] predicts labels[t + 1] within each row, logits are upcast
to float32, positions labelled `ignore_index` do not count, and the result is the mean over counted positions, or
their sum / `num_items_in_batch` when that is given (the Trainer's gradient-accumulation normalisation).

Interface:

* `chunked_causal_lm_loss(hidden_states, lm_head_weight, labels, chunk_size=4096, ignore_index=-100,
  num_items_in_batch=None, shift_labels=None) -> loss`: what `model(..., labels=labels).loss` returns.
* `chunked_causal_lm_loss_sum(...) -> (loss_sum, n_items)`: the same without the division, for callers that
  normalise themselves (e.g. over a global batch).
* `compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, chunk_size=4096)`: a drop-in body for
  `Trainer.compute_loss`. It runs the model's own forward (through PEFT / DDP wrappers) asking for the logits of
  one position only (`logits_to_keep=1`), takes the final hidden states from a forward hook on the decoder stack,
  and calls the output layer *module* chunk by chunk, so whatever wraps it applies (a PEFT `modules_to_save` copy,
  a LoRA-wrapped lm_head whose low-rank term its `.weight` lacks).

        class LongTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return compute_loss(model, inputs, return_outputs, num_items_in_batch, chunk_size=4096)

  `use_cache` defaults to False: with a cache, transformers does not separate packed documents for the stock
  attention. Models whose output layer scales or soft-caps logits (not LLaMA, Mistral, Qwen2) are not covered.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..patch import backbone_of

__all__ = ["chunked_causal_lm_loss", "chunked_causal_lm_loss_sum", "compute_loss", "output_layer"]


def _head_fn(lm_head_weight):
    if isinstance(lm_head_weight, torch.Tensor):
        if lm_head_weight.ndim != 2:
            raise ConfigError(f"lm_head_weight must be a (vocab, hidden) matrix, got {tuple(lm_head_weight.shape)}")
        return lambda h: F.linear(h, lm_head_weight)
    if callable(lm_head_weight):
        return lm_head_weight
    raise ConfigError(f"lm_head_weight must be the output layer's weight or the module itself, got "
                      f"{type(lm_head_weight).__name__}")


def _chunk_sum(head, h, target, ignore_index):
    # upcast as ForCausalLMLoss does: the logits come out in the model dtype, the loss is taken in float32
    return F.cross_entropy(head(h).float(), target, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss_sum(hidden_states, lm_head_weight, labels=None, chunk_size: int = 4096,
                               ignore_index: int = -100, shift_labels=None):
    """(sum of the token losses as a float32 scalar, number of counted positions) of next-token prediction.

    Args:
        hidden_states: (batch, length, hidden), the decoder's final (normed) hidden states.
        lm_head_weight: the output layer: its weight (vocab, hidden), or the module itself (any callable mapping
            (n, hidden) -> (n, vocab); prefer it, so that wrappers such as PEFT's apply).
        labels: (batch, length) token ids; logits[t] is scored against labels[t + 1] of the same row.
        chunk_size: positions whose logits exist at once, >= 1.
        ignore_index: label value that is not scored.
        shift_labels: (batch, length) targets already aligned with the positions (replaces `labels`).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    head = _head_fn(lm_head_weight)
    if shift_labels is None:
        if labels is None:
            raise ConfigError("the causal-LM loss needs labels (or shift_labels)")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if hidden_states.ndim != 3 or tuple(shift_labels.shape) != tuple(hidden_states.shape[:2]):
        raise ConfigError(f"hidden_states (batch, length, hidden) and labels (batch, length) do not match: "
                          f"{tuple(hidden_states.shape)} and {tuple(shift_labels.shape)}")
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(h.device)
    params = getattr(lm_head_weight, "parameters", lambda: [lm_head_weight])()
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for a in range(0, h.shape[0], chunk_size):
        args = (head, h[a:a + chunk_size], target[a:a + chunk_size], ignore_index)
        # NOTE: checkpointed, backward keeps only the chunk's inputs and recomputes its logits when it gets there
        total = total + (checkpoint(_chunk_sum, *args, use_reentrant=False) if grad else _chunk_sum(*args))
    return total, (target != ignore_index).sum()


def chunked_causal_lm_loss(hidden_states, lm_head_weight, labels=None, chunk_size: int = 4096,
                           ignore_index: int = -100, num_items_in_batch=None, shift_labels=None):
    """transformers' causal-LM loss (`ForCausalLMLoss`) computed `chunk_size` positions at a time.

    Arguments as `chunked_causal_lm_loss_sum`; with `num_items_in_batch` (int or tensor) the loss is the sum divided
    by it, otherwise the mean over counted positions (NaN if there are none, as in transformers).
    """
    total, count = chunked_causal_lm_loss_sum(hidden_states, lm_head_weight, labels, chunk_size, ignore_index,
                                              shift_labels)
    if num_items_in_batch is None:
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _unwrap(model):
    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def output_layer(model) -> torch.nn.Module:
    """The output layer module of a causal LM, as called in its forward (a PEFT wrapper around it included)."""
    head = getattr(_unwrap(model), "get_output_embeddings", lambda: None)()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output layer (get_output_embeddings() is None); pass a "
                          "causal LM such as LlamaForCausalLM, or a PEFT model wrapping one.")
    return head


def compute_loss(model, inputs, return_outputs: bool = False, num_items_in_batch=None, chunk_size: int = 4096,
                 ignore_index: int = -100):
    """`Trainer.compute_loss` with the chunked loss: equals `model(**inputs, num_items_in_batch=...).loss`.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2), possibly wrapped by PEFT or DDP.
        inputs: the batch: `labels` (or `shift_labels`) plus what the model's forward takes (input_ids,
            position_ids, attention_mask, ...).
        return_outputs: also return the model output, with `.loss` set; its logits cover the last position only.
        num_items_in_batch, chunk_size, ignore_index: as in `chunked_causal_lm_loss`.

    Returns:
        loss, or (loss, outputs).
    """
    inputs = dict(inputs)
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        raise ConfigError("compute_loss needs `labels` (or `shift_labels`) in the inputs")
    head, backbone = output_layer(model), backbone_of(model)
    captured = []
    hook = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        inputs.setdefault("use_cache", False)
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    loss = chunked_causal_lm_loss(captured[-1], head, labels, chunk_size, ignore_index, num_items_in_batch,
                                  shift_labels)
    if not return_outputs:
        return loss
    outputs["loss"] = loss
    return loss, outputs
