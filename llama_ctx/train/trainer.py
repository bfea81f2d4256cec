"""The transformers `Trainer` with a loss that never builds the full logits, and the run's log callbacks.

At 100K tokens and a 32K vocabulary the logits alone are 100K x 32K floats (12.8 GB in fp32) per sequence, more than
the rest of a LoRA step. `compute_loss` therefore uses `llama_ctx.train.loss.compute_loss`: the forward goes through
the top-level (DDP / FSDP / DeepSpeed) wrapper asking for one position's logits, the final hidden states come from a
forward hook on the decoder stack, and the output layer is called as a module, chunk by chunk, checkpointed, so the
wrappers' gathering and gradient hooks run as usual.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from .loss import compute_loss as chunked_compute_loss

LOG_FILE = "log.jsonl"


class LongContextTrainer(Trainer):
    """`Trainer` whose loss is the chunked causal-LM loss, normalised over the whole accumulated (global) batch."""

    def __init__(self, *args, loss_chunk: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = chunked_compute_loss(model, inputs, return_outputs, num_items_in_batch, chunk_size=self.loss_chunk)
        loss = out[0] if return_outputs else out
        # with num_items_in_batch (tokens of every micro-batch of this optimizer step, on every rank when averaged
        # across devices) the loss is already the step's mean, whatever the accumulation; otherwise the Trainer
        # divides by the accumulation steps
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP and sharded backends average gradients over ranks
        return (loss, out[1]) if return_outputs else loss


class LogCallback(TrainerCallback):
    """Appends every log record (step, loss, learning rate, grad norm, tokens/s) to `output_dir/log.jsonl`.

    On resume, records beyond the checkpoint's step (written by the interrupted run, whose steps are redone) are
    dropped first, so the file always describes one run.
    """

    def __init__(self, output_dir, tokens_per_step: int, resume_step: int | None = None):
        self.path = Path(output_dir) / LOG_FILE
        self.tokens_per_step = tokens_per_step
        self.resume_step = resume_step
        self._t0 = self._step0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0 = time.perf_counter(), state.global_step
        if state.is_world_process_zero and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and self.resume_step is not None and json.loads(line).get("step", 0) <= self.resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self._t0
        steps = state.global_step - self._step0
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if _jsonable(v)}}
        if steps > 0 and elapsed > 0:
            record["tokens_per_s"] = steps * self.tokens_per_step / elapsed
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class EvalCallback(TrainerCallback):
    """Runs `fn(step)` every `every` optimizer steps (the perplexity evaluation of the `eval:` section)."""

    def __init__(self, every: int, fn):
        self.every, self.fn = every, fn

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.fn(state.global_step)


class StopAfter(TrainerCallback):
    """Stops training after `steps` optimizer steps, as if the job had been killed right after that step's save
    (used by the resume tests; the schedule stays that of the full run)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
            control.should_save = state.global_step % args.save_steps == 0 if args.save_steps else False


def read_log(output_dir) -> list[dict]:
    path = Path(output_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _jsonable(v) -> bool:
    return isinstance(v, (int, str, bool)) or (isinstance(v, float) and math.isfinite(v))
