"""Resume: an interrupted-and-resumed run logs the same losses as an uninterrupted one; foreign folders refused."""

import hashlib
from pathlib import Path

import pytest
from train_util import losses, tiny_run, train_cache  # noqa: F401

from llama_ctx import ConfigError
from llama_ctx.train import run
from llama_ctx.train.trainer import StopAfter, read_log

STEPS, SAVE_AT = 6, 3
DROPOUT = {"r": 4, "alpha": 8, "dropout": 0.1}  # LoRA dropout: the resumed run must also restore the RNG state


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_cache):  # noqa: F811
    out = tmp_path_factory.mktemp("a") / "run"
    result = run(tiny_run(out, lora=DROPOUT, training={"resume_from_checkpoint": "auto"}))  # auto + empty: fresh
    return out, result


def test_resumed_losses_equal_the_uninterrupted_run(tmp_path, uninterrupted):
    out_a, result_a = uninterrupted
    assert result_a.resumed_from is None and result_a.steps == STEPS
    out = tmp_path / "run"
    first = run(tiny_run(out, lora=DROPOUT), callbacks=[StopAfter(SAVE_AT)])  # "killed" after the save at step 3
    assert first.steps == SAVE_AT and (out / f"checkpoint-{SAVE_AT}" / "trainer_state.json").is_file()
    second = run(tiny_run(out, lora=DROPOUT, training={"resume_from_checkpoint": "auto"}))
    assert second.resumed_from == str(out / f"checkpoint-{SAVE_AT}") and second.steps == STEPS
    want, got = losses(read_log(out_a)), losses(read_log(out))
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))  # one record per step, none duplicated
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-6, (step, want[step], got[step])
    assert len(set(want.values())) == STEPS  # the losses move: equal sequences are not trivially equal


def test_resume_refuses_a_folder_written_by_another_config(uninterrupted):
    out, _ = uninterrupted
    before = _tree(out)
    with pytest.raises(ConfigError) as e:
        run(tiny_run(out, lora=DROPOUT, training={"resume_from_checkpoint": "auto", "learning_rate": 1e-3}))
    assert "training.resume_from_checkpoint" in str(e.value) and "training.learning_rate" in str(e.value)
    with pytest.raises(ConfigError, match="context.seq_len"):
        run(tiny_run(out, lora=DROPOUT, context={"seq_len": 64}, training={"resume_from_checkpoint": "auto"}))
    with pytest.raises(ConfigError, match="different config"):
        run(tiny_run(out, lora=DROPOUT, training={"resume_from_checkpoint": str(out / f"checkpoint-{SAVE_AT}"),
                                                   "max_steps": 9}))
    assert _tree(out) == before  # nothing written, no checkpoint touched


def test_a_fresh_run_never_overwrites_an_existing_run(uninterrupted):
    out, _ = uninterrupted
    before = _tree(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny_run(out, lora=DROPOUT))
    assert _tree(out) == before


def test_resuming_a_finished_run_says_so(uninterrupted):
    out, _ = uninterrupted
    before = _tree(out)
    with pytest.raises(ConfigError, match="is complete"):  # logging/saving keys may differ: not refused for that
        run(tiny_run(out, lora=DROPOUT, training={"resume_from_checkpoint": True, "logging_steps": 2, "save_steps": 5}))
    assert _tree(out) == before
