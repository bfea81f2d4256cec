"""Which checkpoint a run continues from, and refusing to mix two configs in one output folder.

A run writes its config to `output_dir/llama_ctx_run.json` (and into every checkpoint). Resuming compares the new
config with it, ignoring only keys that cannot change what was trained so far (logging, saving, evaluation);
anything else (learning rate, data, seq_len, max_steps, whose schedule the checkpoint's optimizer follows) is refused
with the list of differences, before any model is loaded or file written.

`training.resume_from_checkpoint`:
  - unset / null / false: start fresh; refused if `output_dir` already holds a run (never overwrite checkpoints);
  - `auto`: the newest complete checkpoint in `output_dir` if there is one (same config), else start fresh;
  - `true`: the newest complete checkpoint, which must exist;
  - a path: that checkpoint (its folder or its parent must hold the same config).
A checkpoint is complete when its `trainer_state.json` exists: the Trainer writes it last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .config import TrainConfig, dump

RUN_FILE = "llama_ctx_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# keys that may differ between the interrupted and the resumed run
FREE = {("training", k) for k in ("resume_from_checkpoint", "output_dir", "logging_steps", "logging_first_step",
                                  "save_steps", "save_total_limit", "report_to", "disable_tqdm", "run_name",
                                  "dataloader_num_workers", "log_level")} | {("eval",)}


def identity(config: TrainConfig) -> dict:
    """The config as a flat {dotted.key: value} without the keys in `FREE`."""
    from .config import training_section

    data = dump(config)
    defaults = {k: f.default for k, f in training_section().model_fields.items() if not f.is_required()}
    data["training"] = json.loads(json.dumps({**defaults, **data["training"]}, default=str))
    flat = _flatten(data)
    return {k: v for k, v in flat.items() if not any(k.split(".")[:len(f)] == list(f) for f in FREE)}


def fingerprint(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir()
             if p.is_dir() and CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def checkpoint_step(path) -> int:
    return int(CHECKPOINT.match(Path(path).name).group(1))


def stored_config(folder) -> dict | None:
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _compare(config: TrainConfig, stored: dict, where: str) -> None:
    mine = identity(config)
    theirs = stored.get("identity", {})
    diff = sorted(set(mine) | set(theirs), key=str)
    diff = [k for k in diff if mine.get(k, "<unset>") != theirs.get(k, "<unset>")]
    if diff:
        lines = "; ".join(f"{k}: {theirs.get(k, '<unset>')!r} there, {mine.get(k, '<unset>')!r} here"
                          for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise ConfigError(f"training.resume_from_checkpoint: {where} was written by a different config: {lines}{more}. "
                          "Resume with the config that wrote it, or set training.output_dir to a new folder")


def _holds_run(out: Path) -> bool:
    return out.is_dir() and (stored_config(out) is not None or bool(checkpoints(out))
                             or (out / "adapter_config.json").is_file()
                             or any(CHECKPOINT.match(p.name) for p in out.iterdir()))


def resolve(config: TrainConfig) -> str | None:
    """The checkpoint to resume from (None: start fresh). Raises ConfigError; reads only, writes nothing."""
    out = config.output_dir
    want = config.training.get("resume_from_checkpoint")
    if isinstance(want, str) and want.lower() in ("false", "no", "none", ""):
        want = None
    if not want:
        if _holds_run(out):
            raise ConfigError(f"training.output_dir: {str(out)!r} already holds a run (checkpoints or an adapter); "
                              "set training.resume_from_checkpoint=auto to continue it, or choose a new output_dir. "
                              "Nothing there was changed")
        return None
    if want is True or str(want).lower() == "auto":
        stored = stored_config(out)
        found = checkpoints(out)
        if stored is None and (found or _holds_run(out)):
            raise ConfigError(f"training.resume_from_checkpoint: {str(out)!r} holds checkpoints without {RUN_FILE}, "
                              "so they cannot be checked against this config; resume with an explicit checkpoint "
                              "path you trust, or choose a new output_dir")
        if stored is not None:
            _compare(config, stored, f"{str(out)!r}")
        if not found:
            if want is True:
                raise ConfigError(f"training.resume_from_checkpoint: no complete checkpoint in {str(out)!r}; use "
                                  "`auto` to start fresh when there is none")
            return None
        return str(found[-1])
    path = Path(str(want))
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"training.resume_from_checkpoint: {str(path)!r} is not a complete checkpoint (no "
                          "trainer_state.json)")
    stored = stored_config(path) or stored_config(path.parent)
    if stored is None:
        raise ConfigError(f"training.resume_from_checkpoint: {str(path)!r} has no {RUN_FILE} (neither has its folder), "
                          "so it cannot be checked against this config")
    _compare(config, stored, repr(str(path)))
    return str(path)


def write_run_file(config: TrainConfig, folder) -> None:
    """Record `config` (and its identity) in `folder`, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"fingerprint": fingerprint(config), "identity": identity(config), "config": dump(config)}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RUN_FILE}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, folder / RUN_FILE)
