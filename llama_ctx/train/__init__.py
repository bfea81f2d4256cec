"""Fine-tuning to long contexts (LongLoRA on transformers 5): see `llama_ctx.train.loss` for the chunked loss."""
