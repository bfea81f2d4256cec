"""Fine-tuning to long contexts (LongLoRA on transformers 5): LoRA + trained embeddings/norms + a rope method +
optional S2-attn, driven by one YAML per experiment.

    llama_ctx.train.run("configs/smoke.yaml", ["training.max_steps=10"])
    llama-ctx merge --base BASE --adapter OUT --out MERGED
    llama-ctx plan --config configs/llama2-7b-100k.yaml --gpus 8 --gpu-memory 80

The chunked causal-LM loss (never the full logits) is `llama_ctx.train.loss`.
"""

from .config import TrainConfig, load_config
from .run import RunResult, run

__all__ = ["run", "RunResult", "TrainConfig", "load_config"]
