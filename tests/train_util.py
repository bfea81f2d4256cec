"""Shared by the tests/test_train_*.py files: a tiny training config (as a dict) and a log reader."""

from __future__ import annotations

import copy

TINY_RUN = {
    "model": {"path": "tiny-random", "dtype": "float32"},
    "context": {"method": "pi", "params": {"factor": 2}, "seq_len": 128},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "trainable": ["embed_tokens", "norm"]},
    "s2_attn": {"enabled": False},
    "data": {"sources": [{"path": "builtin:python-docs", "domain": "docs", "weight": 1.0}], "seed": 0},
    "training": {"output_dir": "OUT", "learning_rate": 2e-3, "lr_scheduler_type": "constant_with_warmup",
                 "warmup_steps": 2, "max_steps": 6, "per_device_train_batch_size": 2, "seed": 0,
                 "logging_steps": 1, "save_steps": 3, "use_cpu": True, "disable_tqdm": True},
}


def tiny_run(output_dir, **sections) -> dict:
    """TINY_RUN with `output_dir` and section overrides merged in (e.g. training={"max_steps": 4})."""
    cfg = copy.deepcopy(TINY_RUN)
    cfg["training"]["output_dir"] = str(output_dir)
    for name, values in sections.items():
        cfg.setdefault(name, {})
        cfg[name].update(values) if isinstance(values, dict) else cfg.__setitem__(name, values)
    return cfg


def losses(log: list[dict]) -> dict[int, float]:
    """step -> logged training loss."""
    return {r["step"]: r["loss"] for r in log if "loss" in r}


import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=False)
def train_cache(tmp_path_factory):
    """One cache folder for the tiny model and built-in texts for the whole session (set in the environment)."""
    path = tmp_path_factory.mktemp("llama_ctx_cache")
    old = os.environ.get("LLAMA_CTX_CACHE")
    os.environ["LLAMA_CTX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLAMA_CTX_CACHE", None)
    else:
        os.environ["LLAMA_CTX_CACHE"] = old
