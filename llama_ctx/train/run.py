"""`run(config)`: the fine-tuning recipe, setup -> train -> save -> evaluate.

Order matters for failures: the config is validated against the model's config.json, files and machine, and the
resume decision is taken, before any model is loaded; the output folder is first written only after the model is
prepared and the first batch is built. A bad config, model or resume folder therefore fails in seconds and leaves
nothing behind (and never touches an earlier run's checkpoints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data import build, steps_for_budget
from ..errors import ConfigError
from . import report
from .checks import check
from .config import TrainConfig, apply_overrides, load_config, validate
from .model import load_base, prepare, write_adapter_metadata
from .resume import checkpoint_step, resolve, write_run_file
from .trainer import EvalCallback, LogCallback, LongContextTrainer, read_log

COLUMNS = ("input_ids", "labels", "position_ids")
logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    seconds: float
    tokens_per_s: float
    log: list[dict] = field(default_factory=list)
    eval: dict | None = None  # length -> perplexity at the end
    resumed_from: str | None = None


def collate(examples: list[dict]) -> dict:
    """Packed rows -> tensors; only the model inputs (no attention mask: position ids mark the documents)."""
    return {k: torch.tensor([e[k] for e in examples], dtype=torch.long) for k in COLUMNS}


def as_config(config, overrides=()) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return validate(apply_overrides(config.model_dump(), list(overrides))) if overrides else config
    if isinstance(config, dict):
        return validate(apply_overrides(config, list(overrides)))
    return load_config(config, list(overrides))


class _CheckpointMetadata(TrainerCallback):
    """Makes every checkpoint a self-describing adapter folder: the run's config and the patched model config."""

    def __init__(self, config: TrainConfig, peft_model):
        self.config, self.peft_model = config, peft_model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_run_file(self.config, folder)
                write_adapter_metadata(self.peft_model, folder)


def run(config, overrides=(), callbacks=()) -> RunResult:
    """Fine-tune as `config` says (a YAML path, a mapping or a `TrainConfig`); returns what was done.

    Args:
        config: the experiment (see configs/*.yaml).
        overrides: `section.key=value` strings applied on top.
        callbacks: extra `TrainerCallback`s (e.g. `trainer.StopAfter` in tests).
    """
    from transformers import set_seed

    config = as_config(config, overrides)
    checked = check(config)
    resume_from = resolve(config)
    cfg = checked.config  # local resources resolved (tiny-random, builtin: texts)
    seq_len = cfg.context.seq_len

    set_seed(int(cfg.training.get("seed", 42)))  # LoRA initialisation
    model, tokenizer = load_base(checked.model_path, checked.gguf_file, cfg.model.dtype, cfg.model.attn_implementation)
    peft_model = prepare(model, cfg)
    dataset = build(cfg.data, tokenizer, seq_len)
    first = next(iter(dataset), None)
    if first is None:
        raise ConfigError("data: the sources yield no training example; check paths, text_field and filters")

    args = cfg.training_arguments()
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.max_steps <= 0:
        args = cfg.training_arguments(max_steps=steps_for_budget(cfg.data.tokens, seq_len, global_batch))
    out = Path(args.output_dir)
    if resume_from and checkpoint_step(resume_from) >= args.max_steps:
        raise ConfigError(f"training.resume_from_checkpoint: the run in {str(out)!r} is complete ({resume_from} is at "
                          f"step {checkpoint_step(resume_from)} of max_steps {args.max_steps}); its adapter is in "
                          "that folder. Nothing was changed")
    callbacks = [LogCallback(out, global_batch * seq_len, checkpoint_step(resume_from) if resume_from else None),
                 _CheckpointMetadata(config, peft_model), *callbacks]
    ev = cfg.eval
    eval_ids = report.eval_tokens(tokenizer, ev) if ev.lengths else None
    if eval_ids is not None and len(eval_ids) < max(ev.lengths):
        raise ConfigError(f"eval.text: {len(eval_ids)} tokens, fewer than the longest eval length {max(ev.lengths)}")
    trainer = None

    def run_eval(step):
        return report.evaluate(trainer.model, eval_ids, ev, out, step, write=trainer.is_world_process_zero())

    trainer = LongContextTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 data_collator=collate, callbacks=callbacks)
    # llama_ctx.eval runs the decoder stack directly, which sharded parameters do not allow: evaluate the merge
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if (args.fsdp or args.deepspeed) and not sharded:
        logger.warning("FSDP / DeepSpeed requested but not enabled by accelerate (it enables them on GPUs only): "
                       "running as plain data parallelism")
    if ev.lengths and ev.eval_steps and not sharded:
        trainer.add_callback(EvalCallback(ev.eval_steps, run_eval))
    if trainer.is_world_process_zero():
        write_run_file(config, out)

    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out))  # adapter (gathered under FSDP / ZeRO-3) + tokenizer
    final_eval = None
    if trainer.is_world_process_zero():
        write_adapter_metadata(trainer.accelerator.unwrap_model(trainer.model), out, config)
    if ev.lengths and not sharded:
        result = run_eval(trainer.state.global_step)
        final_eval = {n: result.ppl[n] for n in result.ppl}
    log = read_log(out)
    steps_run = trainer.state.global_step - (checkpoint_step(resume_from) if resume_from else 0)
    tokens_per_s = steps_run * global_batch * seq_len / seconds if seconds > 0 else 0.0
    if trainer.is_world_process_zero():
        report.plot_loss(log, out / "loss.png")
        report.plot_buckets(out, out / "eval_buckets.png")
        report.write_summary(out, dict(steps=trainer.state.global_step, steps_this_run=steps_run,
                                       seconds_this_run=seconds, tokens_per_s=tokens_per_s,
                                       train_loss=output.training_loss, eval_ppl=final_eval,
                                       resumed_from=resume_from, global_batch=global_batch, seq_len=seq_len,
                                       world_size=args.world_size,
                                       distributed_type=str(trainer.accelerator.distributed_type),
                                       fsdp_version=getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None),
                                                            "fsdp_version", None)))
    return RunResult(out, trainer.state.global_step, seconds, tokens_per_s, log, final_eval, resume_from)
