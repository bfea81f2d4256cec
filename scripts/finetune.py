"""Fine-tune a LLaMA-family model to a longer context window.

    accelerate launch scripts/finetune.py --config configs/smoke.yaml [section.key=value ...]
    python scripts/finetune.py --config configs/smoke.yaml training.max_steps=10
"""

import argparse
import sys

from llama_ctx.errors import LlamaCtxError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, typed as YAML (e.g. lora.r=16)")
    args = parser.parse_args(argv)
    from llama_ctx.train import run

    try:
        result = run(args.config, args.overrides)
    except LlamaCtxError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s; adapter in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
