"""Position methods (kind "position") against the dense float64 forward of `llama_ctx.reference.encodings`.

For every method: logits past the trained window against the reference with the encoding written in from its
formula; a left-padded batch row (with position_ids) equal to the row alone; cached generate() equal to full
forwards; unpatch bit-exact; save_pretrained + llama_ctx.from_pretrained; conflicts and bad parameters refused
with the model untouched.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_ctx
from conftest import assert_padded_generate_equals_full_forward, ids, logits, tiny_model
from llama_ctx.errors import ConfigError, PatchStateError
from llama_ctx.reference import s2
from llama_ctx.reference.encodings import added, dense_logits, multiplied, recurrent_positions, sinusoidal_at

TOL = 1e-5
H = 64  # the tiny model's hidden size


def table(model):
    return model.model.llama_ctx_position.weight.detach().double()


CASES = {  # method -> (params, (patched model, params) -> `encode` for dense_logits, or None); no defaults used
    "nope": (dict(), lambda model, p: None),
    "sinusoidal": (dict(scale=0.5, base=500.0),
                   lambda model, p: added(lambda pos: p["scale"] * sinusoidal_at(pos, H, p["base"]))),
    "multiplicative": (dict(scale=0.8, base=1000.0),
                       lambda model, p: multiplied(lambda pos: p["scale"] * sinusoidal_at(pos, H, p["base"]))),
    "learned-absolute": (dict(max_positions=120, init="sinusoidal", scale=0.3),
                         lambda model, p: added(lambda pos: table(model)[pos])),
    "recursive": (dict(width=16, step=0.02, seed=3),
                  lambda model, p: added(lambda pos: recurrent_positions(model.model.llama_ctx_position,
                                                                         int(pos.max()) + 1)[pos])),
}
TRAINED = ["learned-absolute", "recursive"]  # methods with tensors at model.model.llama_ctx_position


def expected(model, name, x, position_ids=None, attention_mask=None):
    params, encode = CASES[name]
    return dense_logits(model, x, position_ids, encode=encode(model, params), attention_mask=attention_mask)


def test_dense_reference_with_rope_is_the_stock_model():
    """The reference itself: with RoPE written in, it gives the stock model's logits (padding and offsets too)."""
    model, x = tiny_model(), ids(80, batch=2)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor([[3], [0]])
    got = logits(model, x, attention_mask=mask, position_ids=pos)
    want = dense_logits(model, x, pos, attention_mask=mask, rope=True)
    torch.testing.assert_close(got[mask.bool()].double(), want[mask.bool()], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_dense_reference_and_unpatch_is_exact(name):
    model, x = tiny_model(), ids(96)
    before = logits(model, x)
    llama_ctx.patch(model, name, **CASES[name][0])
    assert llama_ctx.state(model) == {"position": {"method": name, "kind": "position", "params": CASES[name][0]}}
    got = logits(model, x)
    assert not torch.allclose(got, before, atol=1e-3)  # rotary is off: the model changed
    torch.testing.assert_close(got.double(), expected(model, name, x), atol=TOL, rtol=0)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before) and llama_ctx.state(model) is None
    assert "forward" not in vars(model.model) and not hasattr(model.model, "llama_ctx_position")


@pytest.mark.parametrize("name", list(CASES))
def test_left_padded_row_equals_the_row_alone(name):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    row, other = ids(50, seed=5), ids(70, seed=6)
    x = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), row], 1), other])
    mask = torch.ones_like(x)
    mask[0, :20] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = logits(model, x, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(batch[:1, 20:], logits(model, row), atol=TOL, rtol=0)
    torch.testing.assert_close(batch[:1, 20:].double(), expected(model, name, row), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_generate_equals_full_forward(name):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    assert_padded_generate_equals_full_forward(model, TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_saved_and_reapplied_stock_loading_refuses(name, tmp_path):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    if name in TRAINED:  # as if trained: the saved values, not the initial ones, must come back
        with torch.no_grad():
            for t in model.model.llama_ctx_position.parameters():
                t.add_(0.05 * torch.randn_like(t))
    x = ids(90)
    want = logits(model, x)
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="llama_ctx.from_pretrained"):  # not a RoPE model in silence
        AutoModelForCausalLM.from_pretrained(tmp_path)
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(llama_ctx.unpatch(again), x), logits(tiny_model(), x), atol=1e-6, rtol=0)


def test_from_pretrained_with_a_config_or_a_hub_id(tmp_path):
    """The ways transformers loads a folder load it here too: config= read from the folder, and a hub id resolved
    through the local cache (its trained tensors restored). A config= that does not record the methods is refused:
    it would load the weights with no method and the trained table dropped, in silence."""
    from transformers import AutoConfig

    model = llama_ctx.patch(tiny_model(), "learned-absolute", **CASES["learned-absolute"][0])
    with torch.no_grad():
        model.model.llama_ctx_position.weight.add_(0.05)  # as if trained
    x = ids(90)
    want = logits(model, x)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    again = llama_ctx.from_pretrained(folder, config=AutoConfig.from_pretrained(folder)).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="does not record them"):
        llama_ctx.from_pretrained(folder, config=tiny_model().config)
    repo = tmp_path / "hub" / "models--org--tiny"  # the layout of the hub cache, filled without a network
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / ("0" * 40))
    offline = dict(cache_dir=str(tmp_path / "hub"), local_files_only=True)
    again = llama_ctx.from_pretrained("org/tiny", adapter_kwargs=offline, **offline).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,s2_first", [("nope", True), ("learned-absolute", True), ("sinusoidal", False)])
def test_s2_attn_composes_with_embedding_side_encodings(name, s2_first):
    """Train mode: position method + S2-attn equals the position method with S2-attn's dense reference."""
    x = ids(96, batch=2)
    steps = [("s2-attn", dict(group_size_ratio=0.25)), (name, CASES[name][0])]
    model = tiny_model()
    for method, params in steps if s2_first else steps[::-1]:
        llama_ctx.patch(model, method, **params)
    got = logits(model.train(), x, use_cache=False)
    want_model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    with s2.dense_reference(want_model.train(), 24):
        want = logits(want_model, x, use_cache=False)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert not torch.allclose(got, logits(want_model, x, use_cache=False), atol=1e-3)  # S2 groups changed it


def test_position_methods_refuse_rope_methods_and_unlisted_attention_methods():
    model, x = tiny_model(), ids(40)
    before = logits(model, x)
    llama_ctx.patch(model, "yarn", factor=2)
    with pytest.raises(PatchStateError, match="'nope' turns rotary off.*'yarn'"):
        llama_ctx.patch(model, "nope")
    llama_ctx.unpatch(model).eval()
    llama_ctx.patch(model, "rerope", window=8)
    with pytest.raises(PatchStateError, match="'rerope' cannot be combined with the position method 'nope'"):
        llama_ctx.patch(model, "nope")
    llama_ctx.unpatch(model)
    llama_ctx.patch(model, "nope")
    state = llama_ctx.state(model)
    for method, params in [("pi", dict(factor=2)), ("rerope", dict(window=8)), ("nope", {})]:
        with pytest.raises(PatchStateError):
            llama_ctx.patch(model, method, **params)
        assert llama_ctx.state(model) == state
    with pytest.raises(ConfigError, match="replace_native=True is for rope methods"):
        llama_ctx.patch(tiny_model(), "nope", replace_native=True)
    assert torch.equal(logits(llama_ctx.unpatch(model), x), before)


def test_bad_parameters_leave_the_model_untouched():
    model, x = tiny_model(), ids(20)
    before = logits(model, x)
    with pytest.raises(ConfigError, match="unknown parameter"):
        llama_ctx.patch(model, "nope", scale=2)
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)


def test_learned_absolute_table_starts_as_the_sinusoidal_table_or_zeros():
    model = llama_ctx.patch(tiny_model(), "learned-absolute", max_positions=70, scale=0.3)
    torch.testing.assert_close(table(model), 0.3 * sinusoidal_at(torch.arange(70), H), atol=1e-7, rtol=0)
    assert model.model.llama_ctx_position.weight.requires_grad
    assert dict(model.named_parameters())["model.llama_ctx_position.weight"] is model.model.llama_ctx_position.weight
    zeros = llama_ctx.patch(tiny_model(), "learned-absolute", init="zeros")
    assert table(zeros).shape == (64, H) and not table(zeros).any()  # default max_positions: the trained window
    x = ids(60)
    assert torch.equal(logits(zeros, x), logits(llama_ctx.patch(tiny_model(), "nope"), x))  # zeros: exactly NoPE


def test_learned_absolute_refuses_positions_past_its_table():
    model = llama_ctx.patch(tiny_model(), "learned-absolute", max_positions=50)
    logits(model, ids(50))
    with pytest.raises(ConfigError, match="position 50 is outside.*max_positions=50.*never clamped"):
        logits(model, ids(51))
    with pytest.raises(ConfigError, match="max_positions >= 53"):
        logits(model, ids(3), position_ids=torch.tensor([[0, 1, 52]]))


def test_recursive_inference_keeps_positions_until_parameters_change():
    model = llama_ctx.patch(tiny_model(), "recursive", width=16)
    module, x = model.model.llama_ctx_position, ids(70)
    logits(model, ids(20))  # kept positions 0..19, extended below
    torch.testing.assert_close(logits(model, x).double(), expected(model, "recursive", x, ), atol=TOL, rtol=0)
    with torch.no_grad():
        module.w2.mul_(3.0)  # an in-place update (an optimizer step) invalidates what was kept
    torch.testing.assert_close(logits(model, x).double(), expected(model, "recursive", x), atol=TOL, rtol=0)


def test_recursive_inference_sees_edits_through_dot_data():
    # `.data` (old-style optimizers, hand edits) has its own version counter: the kept positions must notice anyway
    model = llama_ctx.patch(tiny_model(), "recursive", width=16)
    module, x = model.model.llama_ctx_position, ids(30)
    logits(model, x)
    module.w2.data.mul_(50.0)
    torch.testing.assert_close(logits(model, x).double(), expected(model, "recursive", x), atol=TOL, rtol=0)
    module.start.data = module.start.data + 0.1  # a new tensor under the same parameter
    torch.testing.assert_close(logits(model, x).double(), expected(model, "recursive", x), atol=TOL, rtol=0)


def test_left_padded_batch_without_position_ids_is_refused():
    model = llama_ctx.patch(tiny_model(), "sinusoidal")
    x, mask = ids(10, batch=2), torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ConfigError, match="left-padded and no position_ids"):
        logits(model, x, attention_mask=mask)
    mask[1, :3], mask[1, 7:] = 1, 0  # right padding numbers the real tokens from 0: fine
    logits(model, x, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_left_padded_4d_mask_without_position_ids_is_refused(dtype):
    # a 4D mask (bool, or additive float) hides the padding from every query: the same refusal as a 2D one
    model = llama_ctx.patch(tiny_model(), "sinusoidal")
    x, allowed = ids(10), torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[:, :3] = False
    mask = allowed if dtype == torch.bool else torch.where(allowed, 0.0, torch.finfo(dtype).min)
    with pytest.raises(ConfigError, match="left-padded and no position_ids"):
        logits(model, x, attention_mask=mask[None, None])
    pos = torch.arange(-3, 7).clamp(min=0)[None]
    torch.testing.assert_close(logits(model, x, attention_mask=mask[None, None], position_ids=pos)[0, 3:],
                               logits(model, x[:, 3:])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,params,match", [
    ("sinusoidal", dict(scale=0), "scale must be > 0"), ("sinusoidal", dict(base=1), "base must be > 1"),
    ("multiplicative", dict(scale="1"), "scale must be a finite number"),
    ("learned-absolute", dict(init="random"), "init must be one of"),
    ("learned-absolute", dict(max_positions=0), "max_positions must be >= 1"),
    ("recursive", dict(width=0), "width must be >= 1"), ("recursive", dict(step=-1.0), "step must be > 0"),
])
def test_bad_parameters_are_refused_with_the_model_untouched(name, params, match):
    model, x = tiny_model(), ids(20)
    before = logits(model, x)
    with pytest.raises(ConfigError, match=match):
        llama_ctx.patch(model, name, **params)
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)


@pytest.mark.parametrize("name", ["sinusoidal", "multiplicative", "learned-absolute"])
def test_odd_hidden_size_is_refused_for_sinusoidal_tables(name):
    model = tiny_model()  # transformers validates hidden sizes against heads: give the embedding an odd width
    model.model.embed_tokens = torch.nn.Embedding(256, 65)
    rotary = model.model.rotary_emb
    with pytest.raises(ConfigError, match="even hidden size.*65"):
        llama_ctx.patch(model, name)
    assert llama_ctx.state(model) is None and model.model.rotary_emb is rotary and "forward" not in vars(model.model)
    llama_ctx.patch(model, "learned-absolute", init="zeros")  # a zero table needs no sin/cos pairs
