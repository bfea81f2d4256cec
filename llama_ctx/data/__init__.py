"""Long-text data mixture for context extension (see README "Data mixture").

    ds = llama_ctx.data.build(cfg.data, tokenizer, seq_len)   # datasets.IterableDataset of packed examples
"""

from .config import DataConfig, FiltersConfig, SourceConfig, UpsampleConfig, as_config
from .pack import block_mask, examples_for_budget, steps_for_budget
from .pipeline import Pipeline, build
from .report import preview, summary

__all__ = ["build", "DataConfig", "SourceConfig", "FiltersConfig", "UpsampleConfig", "as_config", "block_mask",
           "steps_for_budget", "examples_for_budget", "Pipeline", "summary", "preview"]
