"""Two CPU processes (torchrun, gloo, DDP) give the single-process run's losses and adapter.

`accelerate launch --cpu` always starts a single process, so the multi-process run uses torchrun, which sets the same
environment that `accelerate launch` sets on GPUs; scripts/finetune.py is unchanged. The reference is one process
with the same global batch (2 x 2 rows): the loss is normalised over the tokens of the global batch, so every step
must match, and the saved adapter (LoRA + embeddings + norms) must equal the single-process one.

FSDP2 and ZeRO-3 are not tested here: accelerate 1.15 enables FSDP only for GPU-type distributed runs (on CPU the
same config runs as DDP) and DeepSpeed needs CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_util import losses, tiny_run, train_cache  # noqa: F401

from llama_ctx.train import run
from llama_ctx.train.trainer import read_log

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _config(out, **training):
    return tiny_run(out, training={"max_steps": STEPS, "save_steps": STEPS, "per_device_train_batch_size": 2,
                                   **training})


@pytest.fixture(scope="module")
def single(tmp_path_factory, train_cache):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "run"
    run(_config(out, per_device_train_batch_size=4))
    return out


def test_two_ddp_processes_match_one(tmp_path, single, train_cache):  # noqa: F811
    out = tmp_path / "run"
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(out)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000),
           str(ROOT / "scripts" / "finetune.py"), "--config", str(cfg_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["distributed_type"] == "DistributedType.MULTI_CPU"
    want, got = losses(read_log(single)), losses(read_log(out))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(want[step] - got[step]) < 1e-5, (step, want[step], got[step])
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any("embed_tokens" in k for k in a) and any("norm" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert (out / f"checkpoint-{STEPS}" / "adapter_model.safetensors").is_file()
