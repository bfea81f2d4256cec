"""Pictures of positional encodings (`llama-ctx plot ...`): the sinusoidal table, dot product against distance
(the long-range decay), and a model's RoPE wavelength spectrum.

Each `plot_*` function draws a PNG and returns the data it drew, so tests can check the numbers, not the pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..eval.results import new_figure, save_figure
from ..registry import check_int, check_number
from .tables import sinusoidal

ENCODINGS = ("sinusoidal", "rope")
DEFAULT_DIM = {"sinusoidal": 512, "rope": 128}  # the Transformer's d_model; a LLaMA-2-7B head


def similarity(encoding: str, max_distance: int = 1000, dim: int | None = None, base: float = 10000.0,
               starts: int = 1, inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dot product between the encoding of a position p and that of p + d, for d = 0 .. max_distance, averaged
    over p = 0 .. starts-1 (float64).

    - "sinusoidal": PE(p) . PE(p + d) for the table `sinusoidal(_, dim, base)`, i.e. sum_i cos(d * w_i) with
      w_i = base^(-2i/dim) (sin a sin b + cos a cos b = cos(a - b)).
    - "rope": q . k of all-ones query and key vectors of size `dim` rotated by transformers' own
      `apply_rotary_pos_emb` at positions p and p + d, i.e. 2 * sum_i cos(d * theta_i): the attention score a
      content-free query gives a content-free key d tokens away. The frequencies are `inv_freq` (a model's, see
      `llama_ctx.rope.base.model_inv_freq`) or base^(-2i/dim).

    Both depend on d only, not on p (`starts` > 1 shows it); both are largest at d = 0 and oscillate around a
    decaying envelope, the "long-term decay" of RoFormer (Su et al. 2021), section 3.4.3.

    Returns:
        (distances `[max_distance + 1]` int64, values `[max_distance + 1]` float64).
    """
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown encoding {encoding!r} for the similarity plot; choose one of {', '.join(ENCODINGS)}")
    max_distance = check_int("max_distance", max_distance, ge=0)
    starts = check_int("starts", starts)
    if inv_freq is not None and encoding != "rope":
        raise ConfigError("inv_freq (a model's frequencies) only applies to encoding='rope'")
    if inv_freq is None:
        dim = check_int("dim", DEFAULT_DIM[encoding] if dim is None else dim)
        if dim % 2:
            raise ConfigError(f"dim must be even (each frequency is a sin/cos or rotation pair), got {dim}")
        inv_freq = check_number("base", base, gt=1.0) ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    distances = torch.arange(max_distance + 1)
    p = torch.arange(starts)[:, None]  # [starts, 1]
    if encoding == "sinusoidal":
        table = sinusoidal(starts + max_distance, dim, base, dtype=torch.float64)
        values = (table[p] * table[p + distances]).sum(-1).mean(0)
    else:
        values = _rope_scores(inv_freq.to(torch.float64), p, p + distances).mean(0)
    return distances, values


def _rope_scores(inv_freq: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """q . k for all-ones q, k rotated by transformers' `apply_rotary_pos_emb` at broadcastable positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_pos, k_pos = torch.broadcast_tensors(q_pos, k_pos)

    def cos_sin(pos):  # transformers' layout: the frequencies repeated over the two halves (`rotate_half`)
        angle = pos.to(torch.float64)[..., None] * torch.cat([inv_freq, inv_freq])
        return angle.cos(), angle.sin()

    ones = torch.ones(1, *q_pos.shape, 2 * len(inv_freq), dtype=torch.float64)  # cos/sin get a leading 1 too
    q, _ = apply_rotary_pos_emb(ones, ones, *cos_sin(q_pos), unsqueeze_dim=0)
    k, _ = apply_rotary_pos_emb(ones, ones, *cos_sin(k_pos), unsqueeze_dim=0)
    return (q * k).sum(-1)[0]


def plot_sinusoidal(path, positions: int = 100, dim: int = 512, base: float = 10000.0) -> torch.Tensor:
    """Heatmap of `sinusoidal(positions, dim, base)`: positions down, dimensions across. Returns the table drawn."""
    table = sinusoidal(positions, dim, base, dtype=torch.float64)
    fig, ax = new_figure(figsize=(8, 4.5))
    im = ax.imshow(table.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("dimension (even: sin, odd: cos; frequency falls to the right)")
    ax.set_ylabel("position")
    ax.set_title(f"sinusoidal encoding, {positions} positions x {dim} dimensions, base {base:g}")
    save_figure(fig, path)
    return table


def plot_similarity(path, encoding: str, max_distance: int = 1000, dim: int | None = None,
                    base: float = 10000.0, starts: int = 1, inv_freq: torch.Tensor | None = None,
                    label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Line plot of `similarity(...)` against the distance. Returns the (distances, values) drawn."""
    distances, values = similarity(encoding, max_distance, dim, base, starts, inv_freq)
    what = {"sinusoidal": "PE(p) · PE(p+d)", "rope": "q · k, all-ones q and k at p and p+d"}[encoding]
    fig, ax = new_figure()
    ax.plot(distances.numpy(), values.numpy(), lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("relative distance d (tokens)")
    ax.set_ylabel(what + ("" if starts == 1 else f", mean over p < {starts}"))
    ax.set_title(f"{encoding}{' ' + label if label else ''}: dot product against distance")
    save_figure(fig, path)
    return distances, values


def plot_rope(config, path, title: str = "") -> list[dict]:
    """A model's RoPE wavelength per dimension pair, log scale, with its trained window drawn across
    (`llama_ctx.rope.inspect.plot`). Returns the `inspect_rope` rows drawn."""
    from ..rope.base import RopeSpec
    from ..rope.inspect import inspect_rope, plot

    rows = inspect_rope(config)
    plot(rows, RopeSpec.from_config(config).trained_window, path, title=title or "RoPE wavelength spectrum")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNG pictures of positional encodings: sinusoidal, similarity, rope")
    what = p.add_subparsers(dest="what", required=True)
    s = what.add_parser("sinusoidal", help="heatmap of the sinusoidal table (positions x dimensions)")
    s.add_argument("--positions", type=int, default=100)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--base", type=float, default=10000.0)
    s.add_argument("--out", default="sinusoidal.png", help="PNG to write")
    s = what.add_parser("similarity", help="dot product of the encodings at p and p + d against d (long-range decay)")
    s.add_argument("--encoding", default="sinusoidal", help=f"one of {', '.join(ENCODINGS)}")
    s.add_argument("--max-distance", type=int, default=1000)
    s.add_argument("--dim", type=int, default=None, help="default: 512 (sinusoidal), 128 (rope)")
    s.add_argument("--base", type=float, default=10000.0)
    s.add_argument("--starts", type=int, default=1, help="average over start positions p = 0 .. starts-1")
    s.add_argument("--model", default=None, help="rope only: take the frequencies from this local folder or .gguf")
    s.add_argument("--gguf-file", default=None)
    s.add_argument("--out", default=None, help="PNG to write (default: similarity-ENCODING.png)")
    s = what.add_parser("rope", help="a model's RoPE wavelength spectrum with its trained window marked")
    s.add_argument("model", nargs="?", default=None, help="local model folder or .gguf file (default: SmolLM2)")
    s.add_argument("--gguf-file", default=None)
    s.add_argument("--out", default="rope-wavelengths.png", help="PNG to write")
    p.set_defaults(func=_plot)


def png_path(out) -> Path:
    """`out` as matplotlib writes it: a name without a suffix gets ".png" (so the path printed is the file written)."""
    out = Path(out)
    return out if out.suffix else out.with_suffix(".png")


def _plot(args) -> None:
    from ..cli import load_config

    args.out = args.out and png_path(args.out)
    if args.what == "sinusoidal":
        plot_sinusoidal(args.out, args.positions, args.dim, args.base)
        out = args.out
    elif args.what == "similarity":
        out = args.out or Path(f"similarity-{args.encoding}.png")
        inv_freq, label = None, ""
        if args.model or args.gguf_file:
            if args.encoding != "rope":
                raise ConfigError("--model only applies to --encoding rope (a model's RoPE frequencies)")
            if args.dim is not None or args.base != 10000.0:
                raise ConfigError("give either --model (its frequencies) or --dim/--base, not both")
            from ..rope.base import RopeSpec, model_inv_freq

            config, label = load_config(args.model, args.gguf_file)
            inv_freq = model_inv_freq(config, RopeSpec.from_config(config))
        plot_similarity(out, args.encoding, args.max_distance, args.dim, args.base, args.starts, inv_freq, label)
    else:
        config, label = load_config(args.model, args.gguf_file)
        plot_rope(config, args.out, title=f"RoPE wavelengths: {label}")
        out = args.out
    print(f"plot written to {Path(out)}")
