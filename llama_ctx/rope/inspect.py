"""Per-dimension view of a rotary embedding: which pairs never completed a turn during training.

Seed 002 ("critical dimensions"): a pair whose wavelength 2*pi/theta exceeds the trained window never saw a
full period in training, so positions beyond the window give it angles it has never met. Frequency methods
differ in what they do to exactly those pairs; this table shows it.
"""

from __future__ import annotations

import math

from .base import RopeSpec, default_inv_freq, model_inv_freq, wavelengths


def inspect_rope(model_or_config, method: str | None = None, *, replace_native: bool = False,
                 **params) -> list[dict]:
    """One row per rotary dimension pair.

    Args:
        model_or_config: a model (its config is read; the model is not changed) or a transformers config.
        method: a rope method name, or None for the model's own frequencies (native scaling included).
        replace_native: as in `patch`: on a model with native rope scaling a method is refused without it; with
            it, the rows compare the unscaled model (frequencies, pre-training window) with the method.
        **params: the method's parameters.

    Returns:
        Rows `{"pair", "theta", "theta_after", "wavelength", "wavelength_after", "critical", "critical_after"}`
        where `critical` means the wavelength exceeds the trained window (`llama_ctx.patch.trained_window`).
    """
    from .. import registry
    from ..patch import _check_replace_native

    config = getattr(model_or_config, "config", model_or_config)
    spec = RopeSpec.from_config(config)
    theta = model_inv_freq(config, spec)
    after = theta
    if method is not None:
        m = registry.get(method)
        if m.kind != "rope":
            raise registry.ConfigError(f"{m.name!r} is an attention method; inspect_rope takes a rope method")
        if spec.scaled:
            _check_replace_native(m, spec, registry.check_flag("replace_native", replace_native), None)
            spec = spec.unscaled()
            theta = default_inv_freq(spec)
        p = registry.make_params(m, {registry.TRAINED_WINDOW: spec.trained_window}, **params)
        after, _ = m.impl(p, spec, None)
    rows = []
    for i, (t, ta, w, wa) in enumerate(zip(theta.tolist(), after.tolist(), wavelengths(theta).tolist(),
                                            wavelengths(after).tolist())):
        rows.append(dict(pair=i, theta=t, theta_after=ta, wavelength=w, wavelength_after=wa,
                         critical=w > spec.trained_window, critical_after=wa > spec.trained_window))
    return rows


def format_table(rows: list[dict], trained_window: int) -> str:
    head = f"{'pair':>4} {'theta':>11} {'theta_after':>11} {'wavelen':>11} {'wavelen_after':>13}  critical"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = {(False, False): "", (True, True): "yes", (True, False): "yes -> no", (False, True): "no -> yes"}
        lines.append(f"{r['pair']:>4} {r['theta']:>11.4g} {r['theta_after']:>11.4g} {_fmt(r['wavelength']):>11} "
                     f"{_fmt(r['wavelength_after']):>13}  {mark[(r['critical'], r['critical_after'])]}")
    n = sum(r["critical"] for r in rows)
    lines.append(f"trained window {trained_window}: {n} of {len(rows)} pairs never completed a turn in training "
                 f"(first critical pair: {next((r['pair'] for r in rows if r['critical']), '-')})")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def plot(rows: list[dict], trained_window: int, path, title: str = "") -> None:
    """Wavelength per pair before/after, log scale, with the trained window drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pairs = [r["pair"] for r in rows]
    ax.semilogy(pairs, [r["wavelength"] for r in rows], "o-", ms=3, label="original")
    finite = [(r["pair"], r["wavelength_after"]) for r in rows if math.isfinite(r["wavelength_after"])]
    if finite and any(r["wavelength_after"] != r["wavelength"] for r in rows):  # no method: one line, not two
        ax.semilogy(*zip(*finite), "s-", ms=3, label="after method")
    ax.axhline(trained_window, color="k", ls="--", lw=1, label=f"trained window ({trained_window})")
    ax.set_xlabel("dimension pair i")
    ax.set_ylabel("wavelength 2π/θ (tokens)")
    ax.set_title(title or "RoPE wavelengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
