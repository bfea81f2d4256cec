"""`llama-ctx merge` and `llama-ctx plan` (the training entry point itself is scripts/finetune.py)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register `merge` and `plan` (each once, so listing this module for both subcommands is fine)."""
    if "merge" not in sub.choices:
        p = sub.add_parser("merge", help="merge a fine-tuned adapter into its base: a standalone model with the "
                                         "rope method in its config")
        p.add_argument("--base", required=True, help="the base model (folder, .gguf file, hub name, tiny-random)")
        p.add_argument("--gguf-file", default=None, help="GGUF file name inside --base")
        p.add_argument("--adapter", required=True, help="training output folder (or one of its checkpoint-N)")
        p.add_argument("--out", required=True, help="destination folder (never overwritten without --force)")
        p.add_argument("--force", action="store_true", help="replace an existing --out (atomically, once the new "
                                                            "model is complete and verified)")
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="dtype of the merged weights (default: the base model's)")
        p.add_argument("--no-verify", action="store_true", help="skip reloading the result and comparing logits")
        p.set_defaults(func=_merge)
    if "plan" not in sub.choices:
        p = sub.add_parser("plan", help="per-GPU memory estimate of a fine-tuning config, per sharding strategy")
        p.add_argument("--config", required=True, help="experiment YAML")
        p.add_argument("--gpus", type=int, default=8)
        p.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
        p.add_argument("overrides", nargs="*", help="section.key=value")
        p.set_defaults(func=_plan)


def _merge(args) -> None:
    from .merge import merge

    out = merge(args.base, args.adapter, args.out, force=args.force, dtype=args.dtype, gguf_file=args.gguf_file,
                verify=not args.no_verify)
    print(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def _plan(args) -> None:
    from .plan import format_plan, plan_config

    print(format_plan(plan_config(args.config, args.overrides, gpus=args.gpus, gpu_memory_gib=args.gpu_memory)))
