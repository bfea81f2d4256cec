"""What every evaluation result shares: JSON round trip, flat CSV rows, a matplotlib PNG (Agg, imported lazily)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path


class Result:
    """Base of the result dataclasses. Subclasses implement `rows()`, `_from_dict()` and `_draw(ax)`."""

    def rows(self) -> list[dict]:
        """One flat dict per CSV line."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict):
        return cls._from_dict(data)

    def to_json(self, path) -> Path:
        """Write the result as JSON (NaN written as null) and return the path."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path) -> Path:
        """Write `rows()` as CSV with a header line and return the path."""
        rows = self.rows()
        header = list(dict.fromkeys(k for r in rows for k in r))
        lines = _CsvLines()
        writer = csv.DictWriter(lines, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        return write_atomic(path, "".join(lines.lines))

    def plot(self, path, title: str | None = None) -> Path:
        """Draw the result into a PNG at `path` and return the path."""
        fig, ax = new_figure()
        self._draw(ax)
        if title:
            ax.set_title(title)
        return save_figure(fig, path)

    def _draw(self, ax) -> None:
        raise NotImplementedError


class _CsvLines:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)


def write_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file, so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def nan_if_none(x) -> float:
    return float("nan") if x is None else float(x)


def line_style(label: str) -> dict:
    """Matplotlib style of a method's loss curve: stock@window is the reference line (black, dash-dot, no markers,
    drawn on top), stock is thick, methods are thin with markers."""
    from .specs import STOCK, STOCK_WINDOW

    if label == STOCK_WINDOW:
        return dict(color="black", ls="-.", lw=2.2, marker=None, zorder=5)
    return dict(marker="o", lw=2.5 if label == STOCK else 1.3)


def new_figure(figsize=(7.5, 4.5), **subplots):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, **subplots)


def save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
