"""`llama-ctx check`: a self-test to run after upgrading torch or transformers.

On tiny random models, with whatever is installed, every registered method is compared with its independent
reference, the definitions in `llama_ctx.reference` that the test suite uses too:

* forward: logits past the trained window against the reference (rope methods: transformers' own rope types, or
  closed forms where transformers has none; attention methods: their dense definitions; position methods: a dense
  float64 forward with the encoding written in);
* generate: cached greedy `generate()` against recomputing every step without a cache (attention and position
  methods), or
  against transformers' native dynamic rope (dynamic-ntk);
* unpatch: logits after `unpatch` are bit-identical to those before `patch`.

A registered method without a case here fails, so no method goes unchecked.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import registry
from .patch import patch, unpatch
from .reference import bias, dca, encodings, positional, rope, s2, selection, streaming

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=64)
TOL = 1e-5  # fp32 logits of a 2-layer model: correct methods are within 3e-7; the tiny random model's logits are
# small, so real mistakes can be small too (a log scale off by one: 2.4e-5, an NTK base 0.5% off: 1.8e-5)
LENGTH = 96  # past the 64-token trained window; a multiple of 8 for s2-attn's groups


@dataclass
class Row:
    method: str
    check: str
    max_error: float
    ok: bool
    note: str = ""


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    model.config._attn_implementation = attn_implementation
    return model.eval()


def clone_with(model, **config_overrides) -> LlamaForCausalLM:
    """A stock model with `model`'s weights and a changed config (e.g. native rope_parameters)."""
    cfg = model.config.to_dict()
    cfg.update(config_overrides)
    cfg = {k: v for k, v in cfg.items() if k in TINY or k in config_overrides or k in ("rope_parameters",)}
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    other.load_state_dict(model.state_dict())
    other.config._attn_implementation = model.config._attn_implementation
    return other.eval()


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)


@torch.no_grad()
def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids, **kw).logits


# ---- references, per method: (stock model, params) -> expected logits of ids(LENGTH) -------------------------


def _native(rope_parameters):
    return lambda model, p: logits(clone_with(model, rope_parameters={"rope_theta": 10000.0, **rope_parameters}),
                                   ids(LENGTH))


def _truncation(model, p):
    model.model.rotary_emb.inv_freq.copy_(rope.truncated_frequencies(16, 10000.0, p["a"], p["b"], p["rho"]))
    return logits(model, ids(LENGTH))


def _positional(name):
    def expected(model, p):
        x = ids(LENGTH)
        with positional.dense_reference(model, name, p, torch.ones_like(x).bool(), positional.default_inv_freq()):
            return logits(model, x, position_ids=torch.arange(LENGTH)[None])
    return expected


def _dca(model, p):
    x = ids(LENGTH)
    with dca.dca_reference(model, p["chunk_size"], p["local_window"], torch.ones_like(x).bool(),
                           positional.default_inv_freq()):
        return logits(model, x, position_ids=torch.arange(LENGTH)[None])


def _streaming(model, p):
    return streaming.dense_reference(model, ids(LENGTH)[0], sinks=p.get("sink_tokens", 4), window=p["window"])[None]


def _s2(model, p):
    """S2-attn is a training-time method: its forward row is in train mode (dropout 0), groups of 96 * 0.25."""
    with s2.dense_reference(model.train(), group=int(LENGTH * p["group_size_ratio"])):
        out = logits(model, ids(LENGTH), use_cache=False)
    model.eval()
    return out


def _position(encode):
    """Position methods: the dense float64 forward with the encoding written in (`encode(patched model, params)`);
    computed while the method is applied, since a trained table lives on the patched model."""
    return lambda model, p: encodings.dense_logits(model, ids(LENGTH), encode=encode(model, p)).float()


def _bias(make):
    """Additive-bias position methods: the dense float64 forward with the explicit `[heads, L, L]` bias matrices of
    `llama_ctx.reference.bias` (`make(patched model, params)`). t5-bias is checked at init, where its table is zero
    (the tests cover a random table)."""
    return lambda model, p: encodings.dense_logits(model, ids(LENGTH), bias=make(model, p)).float()


TRAIN_MODE = {"s2-attn"}  # methods whose forward row is computed in train mode (eval mode is the stock model)
_NATIVE = {name: (params, native) for name, params, native in rope.NATIVE if name != "linear"}
CASES: dict[str, tuple[dict, Callable]] = {  # method -> (params for the tiny model, reference)
    **{name: (params, _native(native)) for name, (params, native) in _NATIVE.items()},
    "ntk": (dict(factor=4.0), _native(dict(rope_type="default", rope_theta=rope.ntk_base(10000.0, 4.0, 16)))),
    "base-truncation": (dict(a=0.01, b=0.1, rho=0.005), _truncation),
    "rerope": (dict(window=16), _positional("rerope")),
    "leaky-rerope": (dict(window=16, factor=4.0), _positional("leaky-rerope")),
    "self-extend": (dict(group_size=4, window=16), _positional("self-extend")),
    "lambda": (dict(global_tokens=4, local_window=24), _positional("lambda")),
    "topk": (dict(k=3, sink_tokens=2, local_window=16),
             lambda model, p: selection.reference_logits(model, ids(LENGTH), "topk", p)),
    "block-topk": (dict(block_size=4, k_blocks=2, sink_tokens=2, local_window=10),
                   lambda model, p: selection.reference_logits(model, ids(LENGTH), "block-topk", p)),
    "streaming": (dict(window=16), _streaming),
    "s2-attn": (dict(group_size_ratio=0.25), _s2),
    "dca": (dict(chunk_size=24, local_window=6), _dca),
    "nope": (dict(), _position(lambda model, p: None)),
    "alibi": (dict(), _bias(lambda model, p: lambda pos: bias.alibi_bias(pos, TINY["num_attention_heads"]))),
    "t5-bias": (dict(num_buckets=16, max_distance=40), _bias(lambda model, p: lambda pos: bias.t5_bias(
        pos, model.model.llama_ctx_position.relative_attention_bias.detach(), **p))),
    "sinusoidal": (dict(scale=0.5), _position(lambda model, p: encodings.added(
        lambda pos: p["scale"] * encodings.sinusoidal_at(pos, TINY["hidden_size"])))),
    "multiplicative": (dict(scale=0.8), _position(lambda model, p: encodings.multiplied(
        lambda pos: p["scale"] * encodings.sinusoidal_at(pos, TINY["hidden_size"])))),
    "learned-absolute": (dict(max_positions=LENGTH + 20, scale=0.3), _position(lambda model, p: encodings.added(
        lambda pos: model.model.llama_ctx_position.weight.detach().double()[pos]))),
    "recursive": (dict(width=16), _position(lambda model, p: encodings.added(
        lambda pos: encodings.recurrent_positions(model.model.llama_ctx_position, int(pos.max()) + 1)[pos]))),
}


def _max_error(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _generate_rows(name, kind, params) -> Row:
    """Cached greedy generate against full recomputation (or native dynamic rope for dynamic-ntk)."""
    model = tiny_model()
    patch(model, name, **params)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, attention_mask=torch.ones(1, 50, dtype=torch.long))
    out = model.generate(ids(50), **kw)
    step = torch.stack(out.logits, dim=1)
    if kind == "rope":  # dynamic-ntk: transformers' native dynamic rope through the same generate
        ref = clone_with(model, rope_parameters={"rope_theta": 10000.0, **_NATIVE[name][1]})
        unpatch(model)
        want = torch.stack(ref.generate(ids(50), **kw).logits, dim=1)
    else:
        want = logits(model, out.sequences, use_cache=False)[:, 49:-1]
    return Row(name, "generate", _max_error(step, want), True)


def check_method(name: str) -> list[Row]:
    m = registry.get(name)
    name = m.name  # an alias ("linear", "dynamic") is checked as the method it names
    if name not in CASES:
        return [Row(name, "reference", float("nan"), False, "no reference case in llama_ctx.check.CASES")]
    params, reference = CASES[name]
    model = tiny_model()
    before = logits(model, ids(LENGTH))
    patch(model, name, **params)
    got = logits(model.train(name in TRAIN_MODE), ids(LENGTH), use_cache=False)
    want = reference(model.eval(), dict(params)) if m.kind == "position" else None
    unpatch(model.eval())
    after = logits(model, ids(LENGTH))
    want = reference(model, dict(params)) if want is None else want
    rows = [Row(name, "forward", _max_error(got, want), True)]
    if m.kind in ("attention", "position") or m.dynamic:
        rows.append(_generate_rows(name, m.kind, params))
    rows.append(Row(name, "unpatch", _max_error(before, after), torch.equal(before, after)))
    for row in rows:
        row.ok = row.ok and row.max_error <= TOL
    return rows


def run(names=None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Check `names` (default: every registered method); a check that raises is reported, not propagated."""
    rows = []
    for name in names or [m["name"] for m in registry.methods()]:
        if progress:
            progress(name)
        try:
            rows += check_method(name)
        except Exception as e:  # noqa: BLE001  (a broken method is a failed row, the others still run)
            rows.append(Row(name, "run", float("nan"), False, f"raised {type(e).__name__}: {e}"[:200]))
    return rows


def versions() -> str:
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"


def main(names=None) -> int:
    """Print the table; 0 if every check passed, 1 otherwise."""
    print(f"llama-ctx check: {versions()}")
    start = time.perf_counter()
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # generate's notes on the tiny model's length are noise here
    try:
        rows = run(names)
    finally:
        logging.set_verbosity(verbosity)
    width = max(len(r.method) for r in rows)
    print(f"{'method':<{width}}  {'check':<10}  {'max error':>10}  ok")
    for r in rows:
        print(f"{r.method:<{width}}  {r.check:<10}  {r.max_error:>10.2e}  {'ok' if r.ok else 'FAIL'}  {r.note}".rstrip())
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="self-test every method against its reference with the installed versions")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.set_defaults(func=lambda args: main(args.methods.split(",") if args.methods else None))
