"""Config validation: every bad input is one ConfigError naming its key, raised before any model is loaded."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from train_util import tiny_run, train_cache  # noqa: F401  (fixture)

from llama_ctx import ConfigError
from llama_ctx.train.checks import check
from llama_ctx.train.config import apply_overrides, load_config, validate

pytestmark = pytest.mark.usefixtures("train_cache")  # tiny model and texts in a session cache
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def checked(tmp_path, overrides=(), **sections):
    return check(validate(apply_overrides(tiny_run(tmp_path / "out", **sections), list(overrides))))


def error(tmp_path, overrides=(), **sections) -> str:
    with pytest.raises(ConfigError) as e:
        checked(tmp_path, overrides, **sections)
    return str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_and_start_with_their_launch_command(path):
    assert path.read_text().startswith("# ") and "scripts/finetune.py --config configs/" in path.read_text()
    load_config(path)


def test_overrides_are_typed_as_yaml_and_reach_nested_items(tmp_path):
    raw = apply_overrides(tiny_run(tmp_path), ["training.learning_rate=1e-4", "lora.r=16", "s2_attn.enabled=true",
                                               "data.sources.0.weight=2.5", "context.params.factor=4",
                                               "lora.target_modules=[q_proj, v_proj]"])
    cfg = validate(raw)
    assert cfg.training["learning_rate"] == 1e-4 and cfg.lora.r == 16 and cfg.s2_attn.enabled is True
    assert cfg.data.sources[0].weight == 2.5 and cfg.context.params == {"factor": 4}
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="data.sources.3: no list item"):
        apply_overrides(tiny_run(tmp_path), ["data.sources.3.weight=1"])
    with pytest.raises(ConfigError, match="not section.key=value"):
        apply_overrides(tiny_run(tmp_path), ["training.max_steps"])


@pytest.mark.parametrize("override, message", [
    ("training.learnig_rate=1", "training.learnig_rate: unknown key; did you mean 'learning_rate'?"),
    ("training.learning_rate=fast", "training.learning_rate: Input should be a valid number"),
    ("training.max_steps=[1]", "training.max_steps: Input should be a valid integer"),
    ("lora.rank=4", "lora.rank: unknown key; did you mean 'r'?"),
    ("lora.r=0", "lora.r: Input should be greater than 0"),
    ("contxt.seq_len=4", "contxt: unknown key; did you mean 'context'?"),
    ("model.dtype=float64", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("s2_attn.group_size_ratio=0", "s2_attn.group_size_ratio: Input should be greater than 0"),
    ("data.sources.0.wieght=1", "unknown key 'wieght'; did you mean 'weight'?"),
    ("eval.lengths=[4q]", "eval.lengths"),
])
def test_schema_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(tiny_run(tmp_path), [override]))
    assert message in str(e.value)


def test_missing_sections_and_several_errors_at_once(tmp_path):
    raw = tiny_run(tmp_path)
    del raw["model"]
    raw["lora"]["r"] = -1
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert "model: missing (required)" in str(e.value) and "lora.r: Input should be greater than 0" in str(e.value)


def test_check_accepts_the_tiny_run_and_resolves_local_resources(tmp_path):
    c = checked(tmp_path)
    assert c.trained_window == 64 and Path(c.model_path, "config.json").is_file()
    assert Path(c.config.data.sources[0].path).is_file() and c.config.data.sources[0].path.endswith(".jsonl")


@pytest.mark.parametrize("overrides, message", [
    (["context.params.factor=1.5"], "context.params.factor: 1.5 x trained window 64 = 96 positions do not cover "
                                    "seq_len 128; use factor >= 2"),
    (["context.method=null", "context.params={}"], "context.seq_len: 128 exceeds the model's trained window (64)"),
    (["context.method=yarnn"], "context.method: unknown method 'yarnn'. Did you mean 'yarn'?"),
    (["context.method=rerope", "context.params={window: 16}"], "context.method: 'rerope' is an attention method"),
    (["context.params={factor: 2, beta: 3}"], "context.params: unknown parameter(s) 'beta' for method 'pi'"),
    (["s2_attn.enabled=true", "context.seq_len=100"], "context.seq_len: 100 must be a multiple of the S2-attn group"),
    (["s2_attn.enabled=true", "s2_attn.group_size_ratio=0.3"], "s2_attn.group_size_ratio: must be 1/n"),
    (["s2_attn.enabled=true", "model.attn_implementation=flash_attention_2"], "s2_attn.enabled: S2-attn runs with"),
    (["model.path=/nonexistent/model"], "model.path: '/nonexistent/model' does not exist"),
    (["model.dtype=float16"], "model.dtype: float16 needs a CUDA GPU"),
    (["training.fp16=true"], "training.fp16: fp16 mixed precision needs a CUDA GPU"),
    (["data.sources.0.path=/nonexistent/corpus.jsonl"], "data.sources[0].path: '/nonexistent/corpus.jsonl' does not"),
    (["data.sources.0.path=builtin:nothing"], "data.sources[0].path: unknown built-in text builtin:nothing"),
    (["eval.text=/nonexistent.txt", "eval.lengths=[64]"], "eval.text: '/nonexistent.txt' does not exist"),
    (["training.max_steps=-1"], "training.max_steps: set it, or data.tokens"),
    (["training.parallelism_config={cp_size: 2}"], "training.parallelism_config.cp_size: context parallelism"),
    (["training.lr_scheduler_type=sometimes"], "training: "),
])
def test_checks_name_the_key(tmp_path, overrides, message):
    assert message in error(tmp_path, overrides)


def test_cp_with_s2_gives_the_s2_reason(tmp_path):
    msg = error(tmp_path, ["s2_attn.enabled=true", "training.parallelism_config={cp_size: 2}"])
    assert "S2-attn shifts groups" in msg


def test_cp_from_the_accelerate_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "4")
    assert "cp_size=4" in error(tmp_path)


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    msg = error(tmp_path, [f"model.path={tmp_path / 'm'}", "model.gguf_file=model.gguf"])
    assert msg.startswith("model.gguf_file: reading GGUF files needs the `gguf` package")


def test_model_folder_with_only_a_gguf_suggests_gguf_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"GGUF")
    assert "set model.gguf_file" in error(tmp_path, [f"model.path={tmp_path / 'm'}"])


def test_trained_window_is_read_from_config_json_without_weights(tmp_path):
    """A folder holding only config.json (no weights) is enough for every check."""
    import json

    from llama_ctx.train.builtin import TINY_CONFIG

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama",
                                                            "max_position_embeddings": 32}))
    msg = error(tmp_path, [f"model.path={tmp_path / 'm'}"])
    assert "2 x trained window 32 = 64 positions do not cover seq_len 128" in msg


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["model.dtype=float16"], "model.dtype: float16 needs a CUDA GPU"),
    (["lora.target_modules=[qq_proj]"], "lora: "),  # found only when PEFT wraps the loaded model
    (["context.params.factor=1"], "context.params.factor"),
])
def test_a_failed_run_leaves_no_output(tmp_path, overrides, message):
    from llama_ctx.train import run

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run(tiny_run(out), overrides)
    assert not out.exists()
