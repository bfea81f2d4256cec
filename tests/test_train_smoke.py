"""configs/smoke.yaml end to end, as CI runs it: train (interrupted after a checkpoint), resume, merge, reload."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import ids
from train_util import losses, train_cache  # noqa: F401
from transformers import AutoModelForCausalLM

from llama_ctx.train import run
from llama_ctx.train.builtin import tiny_random
from llama_ctx.train.merge import merge
from llama_ctx.train.model import load_adapter
from llama_ctx.train.trainer import StopAfter, read_log

pytestmark = pytest.mark.slow  # about 1-2 minutes on 2 CPU cores
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _finetune_script():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_config_trains_resumes_merges_and_reloads(tmp_path, train_cache):  # noqa: F811
    out = tmp_path / "smoke"
    first = run(SMOKE, [f"training.output_dir={out}"], callbacks=[StopAfter(20)])  # as if killed after step 20
    assert first.steps == 20 and (out / "checkpoint-20" / "adapter_model.safetensors").is_file()
    # the same command as a user would type it, continuing the run
    assert _finetune_script().main(["--config", str(SMOKE), f"training.output_dir={out}",
                                    "training.resume_from_checkpoint=auto"]) == 0
    log = losses(read_log(out))
    assert sorted(log) == list(range(5, 41, 5))
    assert log[5] - log[40] > 1.0, log  # the loss falls (5.4 -> ~3.2 nats measured)
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "tokenizer.json", "loss.png",
                 "eval_buckets.png", "eval/step-40.json", "checkpoint-40/trainer_state.json"):
        assert (out / name).is_file(), name

    merged = merge("tiny-random", out, tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(merged).eval()  # stock transformers, no llama_ctx
    reference, _ = load_adapter(tiny_random(), out)  # base + patch recorded in the adapter + adapter
    x = ids(256)  # 4x the tiny model's 64-token window
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, reference.eval()(x).logits, atol=1e-4, rtol=0)
    assert stock.config.rope_parameters["rope_type"] == "linear" and stock.config.rope_parameters["factor"] == 4
