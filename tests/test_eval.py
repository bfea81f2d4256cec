import argparse
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import clone_with, ids, tiny_model
from test_eval_window import allowed_begin, brute_loss

import llama_ctx
from llama_ctx import ConfigError
from llama_ctx.eval import (GRID, NeedleResult, PasskeyResult, PerplexityResult, builtin_long_text, load_text, needle,
                            parse_length, parse_method_spec, passkey, perplexity, sweep)
from llama_ctx.eval import cli as eval_cli
from llama_ctx.eval.needle import needle_prompt, needle_score
from llama_ctx.eval.passkey import passkey_correct, passkey_prompt
from llama_ctx.eval.perplexity import bucket_edges
from llama_ctx.eval.sweep import candidates, region_loss


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ---- perplexity -----------------------------------------------------------------------------------------------


def reference_token_losses(model, seq, length, stride):
    """The transformers guide's loop, written out: full logits, labels -100 outside the scored part.

    Returns (position in window, loss) of every scored token and the guide's token-weighted mean NLL.
    """
    out, nll_sum, n_tokens, prev_end = [], 0.0, 0, 0
    for begin in range(0, len(seq), stride):
        end = min(begin + length, len(seq))
        trg_len = end - prev_end
        window = seq[begin:end][None]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            res = model(window, labels=labels)
        losses = F.cross_entropy(res.logits[0, :-1].float(), labels[0, 1:], reduction="none", ignore_index=-100)
        valid = (labels[0, 1:] != -100).nonzero().flatten()
        out += [(int(j) + 1, float(losses[j])) for j in valid]
        nll_sum += res.loss.item() * len(valid)
        n_tokens += len(valid)
        prev_end = end
        if end == len(seq):
            break
    return out, nll_sum / n_tokens


@pytest.mark.parametrize("length,stride,n", [(64, None, 200), (64, 16, 100), (48, 48, 150)])
def test_perplexity_matches_guide_loop(model, length, stride, n):
    seq = ids(n)[0]
    res = perplexity(model, seq, [length], stride=stride, buckets=16)
    scored, mean_nll = reference_token_losses(model, seq, length, stride or length)
    assert res.tokens[length] == len(scored)
    assert res.ppl[length] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    for (s, e, loss), count in zip(res.bucket_loss[length], res.bucket_tokens[length]):
        inside = [x for p, x in scored if s <= p < e]
        assert count == len(inside)
        assert loss == pytest.approx(sum(inside) / len(inside), rel=1e-5)


def test_every_token_but_the_first_is_scored_once_with_overlapping_windows(model):
    # 100 tokens, windows of 64 every 16: [0,64) scores 63, [16,80) 16, [32,96) 16, [48,100) 4
    res = perplexity(model, ids(100), [64], stride=16, buckets=[60])
    assert res.tokens[64] == 99
    # positions < 60: 1..59 of the first window, 48..59 of the next two, 48..51 of the last; >= 60: 60..63 of three
    assert res.bucket_tokens[64] == [59 + 12 + 12 + 4, 4 + 4 + 4]


def test_default_buckets_follow_the_trained_window():
    assert bucket_edges(128, None, 64) == list(range(0, 129, 16))  # trained window / 4
    assert bucket_edges(1024, None, 64) == list(range(0, 1025, 64))  # widened to 16 buckets, window aligned
    assert bucket_edges(4096, None, 64) == list(range(0, 4097, 64))  # but never wider than the window
    assert bucket_edges(80, None, None) == [0, 10, 20, 30, 40, 50, 60, 70, 80]  # length / 8
    assert bucket_edges(64, [32, 16, 100], 64) == [0, 16, 32, 64]


def test_perplexity_on_patched_model_reports_original_window_and_differs(model):
    seq = ids(128)[0]
    stock = perplexity(model, seq, [128])
    with llama_ctx.patched(model, "pi", factor=2):
        pi = perplexity(model, seq, [128])
    assert pi.trained_window == stock.trained_window == 64
    assert pi.ppl[128] != stock.ppl[128]
    assert perplexity(model, seq, [128]).ppl[128] == stock.ppl[128]  # unpatched again


def test_perplexity_bad_input(model):
    with pytest.raises(ConfigError, match="50 tokens and 64 are needed"):
        perplexity(model, ids(50), [64])
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, ids(80), [32], stride=40)
    with pytest.raises(ConfigError, match="one sequence"):
        perplexity(model, ids(80, batch=2), [32])


def test_perplexity_result_round_trip_and_plot(model, tmp_path):
    res = perplexity(model, ids(130), [64, 32], buckets=[1, 32])
    assert math.isnan(res.bucket_loss[64][0][2])  # position 0 is never a target: empty bucket
    back = PerplexityResult.from_json(res.to_json(tmp_path / "r.json"))
    assert back.ppl == res.ppl and back.tokens == res.tokens and back.trained_window == 64
    assert [x[:2] for x in back.bucket_loss[64]] == [x[:2] for x in res.bucket_loss[64]]
    assert back.bucket_loss[64][1][2] == res.bucket_loss[64][1][2] and math.isnan(back.bucket_loss[64][0][2])
    lines = res.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("length,ppl,tokens") and len(lines) == 1 + 3 + 2  # buckets [0,1) [1,32) [32,64); [0,1) [1,32)
    assert res.plot(tmp_path / "r.png").stat().st_size > 1000


def reference_losses_by_position(model, seq, label):
    """(position, loss) of tokens 1.. of one window over all of `seq`, for the method `label` (stock@window: the
    brute-force windowed reference, trained window 64, default sub-window stride 64 // 8)."""
    if label == "stock@window":
        return [(t, brute_loss(model, seq, allowed_begin(t, 64, 8), t)) for t in range(1, len(seq))]
    with parse_method_spec(label).applied(model):
        return reference_token_losses(model, seq, len(seq), len(seq))[0]


# ---- passkey ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_length_and_depth(depth):
    tok = char_tokenizer()
    prompt, n = passkey_prompt(tok, 4000, depth, 12345)
    assert n == len(tok(prompt)["input_ids"])
    assert 4000 - 95 < n <= 4000  # within one filler group (90 characters) of the request
    position = prompt.index("The pass key is 12345")  # one character per token
    assert abs(position / n - depth) < 0.05


class FakeLM(torch.nn.Module):
    """generate() answers with the number after 'The pass key is' in the prompt (or a fixed wrong one)."""

    def __init__(self, tokenizer, pattern=r"The pass key is (\d+)", wrong=False):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.pattern, self.wrong, self.seen = tokenizer, pattern, wrong, []

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id):
        assert do_sample is False and attention_mask.shape == input_ids.shape
        prompt = self.tok.decode(input_ids[0], skip_special_tokens=True)
        self.seen.append(len(input_ids[0]))
        found = re.search(self.pattern, prompt)
        answer = " 00000." if self.wrong else " " + found.group(1) + "."
        new = torch.tensor([self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]])
        return torch.cat([input_ids, new], 1)


def test_passkey_scores_a_model_that_finds_the_key(tmp_path):
    tok = char_tokenizer()
    good = passkey(FakeLM(tok), tok, [600, 900], [0.0, 0.5, 1.0], trials=2, seed=3)
    assert [c["accuracy"] for c in good.cells] == [1.0] * 6
    assert good.accuracy[(900, 0.5)] == 1.0 and len(set(good.cells[0]["keys"])) == 2
    bad = passkey(FakeLM(tok, wrong=True), tok, [600], [0.5], trials=3, seed=3)
    assert bad.cells[0]["accuracy"] == 0.0 and bad.cells[0]["correct"] == 0
    again = passkey(FakeLM(tok), tok, [900], [0.5], trials=2, seed=3)  # keys depend on the cell, not on order
    assert again.cells[0]["keys"] == good.cells[4]["keys"]
    back = PasskeyResult.from_json(good.to_json(tmp_path / "p.json"))
    assert back.cells == good.cells
    assert good.plot(tmp_path / "p.png").stat().st_size > 1000
    assert "outputs" not in good.to_csv(tmp_path / "p.csv").read_text().splitlines()[0]


def test_passkey_bad_input():
    tok = char_tokenizer()
    with pytest.raises(ConfigError, match="too short"):
        passkey(FakeLM(tok), tok, [50], [0.5], 1, 0)
    with pytest.raises(ConfigError, match="depths"):
        passkey(FakeLM(tok), tok, [600], [1.5], 1, 0)


SHARED_CASES = {"stock": None, "yarn": dict(factor=4), "rerope": dict(window=16),
                "leaky-rerope": dict(window=16, factor=4), "self-extend": dict(group_size=8, window=16),
                "lambda": dict(global_tokens=4, local_window=32), "dca": dict(chunk_size=48, local_window=8)}


@pytest.mark.parametrize("method", list(SHARED_CASES))
def test_passkey_with_a_shared_prefix_gives_the_same_outputs_for_less_compute(method):
    tok, model = char_tokenizer(), tiny_model(max_position_embeddings=64)
    if SHARED_CASES[method] is not None:
        llama_ctx.patch(model, method, **SHARED_CASES[method])
    fed = []
    model.model.register_forward_pre_hook(lambda m, a, kw: fed.append((kw.get("input_ids") if "input_ids" in kw
                                                                       else a[0]).shape[1]), with_kwargs=True)
    plain = passkey(model, tok, [300], [0.1, 0.9], trials=3, seed=1)
    cost = sum(fed)
    fed.clear()
    shared = passkey(model, tok, [300], [0.1, 0.9], trials=3, seed=1, share_prefix=True)
    assert [c["outputs"] for c in shared.cells] == [c["outputs"] for c in plain.cells]
    assert all(len(set(c["outputs"])) >= 1 and c["outputs"][0] for c in plain.cells)  # real text was generated
    # depth 0.9: the three trials share ~90% of their prompt, depth 0.1 ~10%: (0.1 + 3 * 0.9 + 0.9 + 3 * 0.1) / 6
    assert sum(fed) < 0.7 * cost


@pytest.mark.parametrize("method,params", [("dynamic-ntk", dict(factor=4)), ("streaming", dict(sink_tokens=4,
                                                                                               window=32))])
def test_passkey_share_prefix_refuses_methods_where_pieces_differ(method, params):
    tok, model = char_tokenizer(), tiny_model()
    llama_ctx.patch(model, method, **params)
    with pytest.raises(ConfigError, match=f"share_prefix=True.*{method}.*use share_prefix=False"):
        passkey(model, tok, [300], [0.5], trials=2, seed=0, share_prefix=True)
    native = clone_with(tiny_model(), rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
    with pytest.raises(ConfigError, match="native rope_type 'dynamic'"):
        passkey(native, tok, [300], [0.5], trials=2, seed=0, share_prefix=True)


# ---- needle ----------------------------------------------------------------------------------------------------

NEEDLE = "The secret ingredient of the soup is fresh basil."
QUESTION = "What is the secret ingredient of the soup? Answer: The secret ingredient is"


def test_needle_score():
    assert needle_score(" Fresh basil, of course.", "fresh basil") == 1.0
    assert needle_score(" basil leaves", "fresh basil") == 0.5
    assert needle_score(" tomato", "fresh basil") == 0.0
    # whole words and numbers, not substrings
    assert needle_score(" 1421", "42") == 0.0 and needle_score(" It is 42.", "42") == 1.0
    assert needle_score(" eat a sandwiches", "eat a sandwich") == pytest.approx(2 / 3)
    assert needle_score(" Dolores Parkside", "Dolores Park") == 0.5


def test_passkey_key_must_be_a_whole_number():
    assert passkey_correct(" The pass key is 12345.", 12345) and passkey_correct("12345", 12345)
    assert not passkey_correct(" 912345", 12345) and not passkey_correct(" 123456", 12345)


def test_needle_prompt_places_the_needle_at_a_sentence_boundary_near_depth():
    tok = char_tokenizer()
    hay = builtin_long_text(10_000)
    hay_ids = tok(hay, add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.3, 0.7, 1.0):
        prompt, n, _ = needle_prompt(tok, hay_ids, NEEDLE, QUESTION, 3000, depth)
        at = prompt.index(NEEDLE)
        assert 3000 - 4 <= n <= 3000 and prompt.endswith("\n\n" + QUESTION)
        assert abs(at / n - depth) < 0.2 and (depth in (0, 1) or prompt[at - 2:at] == ". " or prompt[at - 1] == "\n")


def test_needle_run_round_trip_and_heatmap(tmp_path):
    tok = char_tokenizer()
    fake = FakeLM(tok, pattern=r"The secret ingredient of the soup is (fresh basil)")
    res = needle(fake, tok, builtin_long_text(10_000), NEEDLE, QUESTION, "fresh basil", [800, 1600], [0.0, 0.5, 1.0])
    assert [c["score"] for c in res.cells] == [1.0] * 6 and res.score[(1600, 0.5)] == 1.0
    assert NeedleResult.from_json(res.to_json(tmp_path / "n.json")).cells == res.cells
    rows = res.to_csv(tmp_path / "n.csv").read_text().splitlines()
    assert rows[0].startswith("length,depth,tokens") and len(rows) == 7
    assert res.plot(tmp_path / "n.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="haystack is too short"):
        needle(fake, tok, "Tiny text.", NEEDLE, QUESTION, "basil", [800], [0.5])


# ---- specs, text -----------------------------------------------------------------------------------------------


def test_specs_and_lengths():
    assert parse_length("8k") == 8192 and parse_length("32768") == 32768 and parse_length("1.5k") == 1536
    spec = parse_method_spec("yarn:factor=4:beta_fast=16.5:original_max_position_embeddings=64")
    assert spec.params == {"factor": 4, "beta_fast": 16.5, "original_max_position_embeddings": 64}
    assert spec.patch_call() == "llama_ctx.patch(model, 'yarn', factor=4, beta_fast=16.5, " \
                                "original_max_position_embeddings=64)"
    assert parse_method_spec("linear:factor=2").name == "pi"  # aliases resolve
    assert parse_method_spec(" stock@window ") == llama_ctx.eval.MethodSpec("stock@window")
    for bad, msg in [("8q", "bad length"), ("0", ">= 2"), ("1.3", "whole number")]:
        with pytest.raises(ConfigError, match=msg):
            parse_length(bad)
    for bad, msg in [("pi:factor", "not key=value"), ("yarm:factor=2", "Did you mean 'yarn'"),
                     ("stock:x=1", "no parameters"), (":factor=2", "no method name"),
                     ("stock@window:x=1", "no parameters"), ("stock@8k", "only used in 'stock@window'"),
                     ("yarn@window", "only used in 'stock@window'"), ("stock@", "only used")]:
        with pytest.raises(ConfigError, match=msg):
            parse_method_spec(bad)


def test_composed_specs_patch_left_to_right_and_unpatch(model):
    spec = parse_method_spec("yarn:factor=2+dca:chunk_size=48")
    assert spec.label == "yarn:factor=2+dca:chunk_size=48" and parse_method_spec(spec.label) == spec
    assert spec.patch_call() == ("llama_ctx.patch(model, 'yarn', factor=2); "
                                 "llama_ctx.patch(model, 'dca', chunk_size=48)")
    assert parse_method_spec("ntk:base=1e+5").params == {"base": 1e5}  # the + of a number is not a composition
    x = ids(100)
    with spec.applied(model):
        assert [a["method"] for a in llama_ctx.state(model).values()] == ["yarn", "dca"]
        got = model(x).logits
    assert llama_ctx.state(model) is None
    llama_ctx.patch(model, "yarn", factor=2)
    llama_ctx.patch(model, "dca", chunk_size=48)
    torch.testing.assert_close(got, model(x).logits, rtol=0, atol=0)
    llama_ctx.unpatch(model)
    for bad, msg in [("yarn:factor=2+pi:factor=2", "composes two rope methods"), ("stock+dca", "cannot be composed"),
                     ("yarn:factor=2+", "no method name")]:
        with pytest.raises(ConfigError, match=msg):
            parse_method_spec(bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(llama_ctx.errors.PatchStateError, match="'nope' turns rotary off"):  # model restored
        with parse_method_spec("yarn:factor=2+nope").applied(model):
            pass
    assert llama_ctx.state(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text('{"body": "beta"}\n{"body": "gamma"}\n')
    assert load_text(tmp_path / "a.txt") == "alpha text"
    assert load_text(tmp_path / "b.jsonl", text_field="body") == "beta\n\ngamma"
    assert load_text(tmp_path, text_field="body") == "alpha text\n\nbeta\n\ngamma"
    with pytest.raises(ConfigError, match="no column 'text'.*body"):
        load_text(tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    text = builtin_long_text(100_000)
    assert len(text) >= 100_000 and text == builtin_long_text(100_000) and "statement" in text


# ---- sweep -----------------------------------------------------------------------------------------------------


def test_sweep_ranks_grid_against_stock(model, tmp_path, monkeypatch):
    seq = ids(128)[0]
    monkeypatch.setitem(GRID, "not-registered", lambda r, T, L: [{"window": T}])
    res = sweep(model, seq, 128, methods=["pi", "yarn", "not-registered"], buckets=32)
    labels = [x["label"] for x in res.ranking]
    # r = 128 / 64 = 2: factors r/2 = 1 (dropped: no extension), 2, 4; unregistered methods are skipped
    assert sorted(labels) == ["pi:factor=2", "pi:factor=4", "stock", "stock@window", "yarn:factor=2",
                              "yarn:factor=4"]
    beyond = [x["loss_beyond"] for x in res.ranking]
    assert beyond == sorted(beyond)
    ref = {}
    for x in res.ranking:  # loss beyond the trained window, recomputed from the dense / brute-force reference
        part = [loss for p, loss in reference_losses_by_position(model, seq, x["label"]) if p >= 64]
        ref[x["label"]] = sum(part) / len(part)
        assert x["loss_beyond"] == pytest.approx(ref[x["label"]], rel=1e-5)
    for x in res.ranking:
        assert x["delta_vs_window"] == pytest.approx(ref[x["label"]] - ref["stock@window"], abs=1e-5)
    assert res.table().splitlines()[-1] == f"best: {res.best['patch']}"
    assert llama_ctx.state(model) is None
    assert res.plot(tmp_path / "s.png").stat().st_size > 1000
    assert [x["label"] for x in type(res).from_json(res.to_json(tmp_path / "s.json")).ranking] == labels
    with pytest.raises(ConfigError, match="must exceed the trained window"):
        sweep(model, seq, 64)
    with pytest.raises(ConfigError, match="straddles the trained window 64"):
        region_loss(perplexity(model, seq, [128], buckets=48), 128, 64, True)
    with pytest.raises(ConfigError, match="no grid"):
        sweep(model, seq, 128, methods=["base-truncation"])


def test_sweep_of_a_composition_is_the_product_of_its_grids(model):
    seq = ids(128)[0]
    res = sweep(model, seq, 128, methods=["yarn:factor=4+dca"], buckets=32)
    # T = 64: dca's four (chunk_size, local_window) points, each under yarn factor 4
    want = {f"yarn:factor=4+dca:chunk_size={c}:local_window={w}" for c, w in [(48, 4), (48, 16), (32, 4), (56, 4)]}
    assert {x["label"] for x in res.ranking} == want | {"stock", "stock@window"}
    assert len(candidates(model, 128, ["yarn+dca"])) == 2 + 2 * 4  # yarn factors 2 and 4 (r / 2 = 1 is dropped) x dca
    row = next(x for x in res.ranking if x["label"].endswith("chunk_size=48:local_window=4"))
    llama_ctx.patch(model, "yarn", factor=4)
    llama_ctx.patch(model, "dca", chunk_size=48, local_window=4)
    both = [loss for p, loss in reference_token_losses(model, seq, 128, 128)[0] if p >= 64]
    llama_ctx.unpatch(model)
    with llama_ctx.patched(model, "dca", chunk_size=48, local_window=4):
        alone = [loss for p, loss in reference_token_losses(model, seq, 128, 128)[0] if p >= 64]
    assert row["loss_beyond"] == pytest.approx(sum(both) / len(both), abs=2e-6)
    # and that agreement tells the two apart: without the yarn part the mean would be 10x the tolerance away
    assert abs(sum(alone) / len(alone) - sum(both) / len(both)) > 10 * 2e-6


def test_sweep_regions_are_split_at_the_trained_window(model):
    seq = ids(128)[0]
    res = sweep(model, seq, 128, methods=["pi"], buckets=48)  # buckets 0-48, 48-96, 96-128: one straddles 64
    assert [(s, e) for s, e, _ in res.ranking[0]["bucket_loss"]] == [(0, 48), (48, 64), (64, 96), (96, 128)]
    for x in res.ranking:
        scored = reference_losses_by_position(model, seq, x["label"])
        for key, part in (("loss_within", [loss for p, loss in scored if p < 64]),
                          ("loss_beyond", [loss for p, loss in scored if p >= 64])):
            assert x[key] == pytest.approx(sum(part) / len(part), rel=1e-5)


def test_every_default_candidate_is_ranked(model):
    specs = candidates(model, 128)
    assert "streaming:window=59" in [s.label for s in specs]  # 4 sinks + 59 + 1 = the trained window 64
    res = sweep(model, ids(128)[0], 128)
    assert len(res.ranking) == len(specs) > 20
    assert [x["label"] for x in res.ranking if x["error"] or not math.isfinite(x["loss_beyond"])] == []


# ---- CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    text = tmp_path / "book.txt"
    text.write_text(builtin_long_text(20_000)[:20_000])
    return path, text


def cli(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    eval_cli.add_parser(sub)
    eval_cli.add_parser(sub)  # idempotent: cli.py lists this module for both `eval` and `sweep`
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_ppl_two_methods_side_by_side_and_resumable(saved, tmp_path, capsys, monkeypatch):
    path, text = saved
    out = tmp_path / "out"
    base = ["eval", "ppl", "--model", path, "--text", text, "--out", out, "--methods", "stock,pi:factor=2"]
    cli(*base, "--lengths", "32,128")
    table = capsys.readouterr().out
    assert re.search(r"stock\s+\S+\s+\S+", table) and "pi:factor=2" in table and "position bucket" in table
    results = json.loads((out / "ppl" / "results.json").read_text())
    model, tok = llama_ctx.io.load(path)
    seq = tok(text.read_text()[:128 * 24])["input_ids"]
    assert results["stock"]["ppl"]["128"] == pytest.approx(perplexity(model, seq[:128], [128]).ppl[128])
    with llama_ctx.patched(model, "pi", factor=2):
        assert results["pi:factor=2"]["ppl"]["32"] == pytest.approx(perplexity(model, seq[:32], [32]).ppl[32])
    # stock@window is added beside stock by default; past the trained window (64) it is the windowed reference
    assert list(results) == ["stock", "stock@window", "pi:factor=2"] and "stock@window" in table
    windowed = [loss for _, loss in reference_losses_by_position(model, torch.tensor(seq[:128]), "stock@window")]
    assert results["stock@window"]["ppl"]["128"] == pytest.approx(math.exp(sum(windowed) / 127), rel=1e-5)
    assert results["stock@window"]["ppl"]["32"] == results["stock"]["ppl"]["32"]  # within the window: the same
    assert len(list((out / "ppl" / "cells").glob("*.json"))) == 6
    for f in ("results.csv", "ppl-compare.png", "ppl-stock.png", "ppl-pi_factor=2.png", "ppl-stock_window.png"):
        assert (out / "ppl" / f).stat().st_size > 0

    calls = []
    real = eval_cli.perplexity
    monkeypatch.setattr(eval_cli, "perplexity",
                        lambda m, t, lengths, *a, **kw: calls.append(lengths) or real(m, t, lengths, *a, **kw))
    cli(*base, "--lengths", "32,128")  # everything is done already
    assert calls == []
    cli(*base, "--lengths", "32,64,128")  # only the new length is measured, earlier cells are kept
    assert calls == [[64], [64], [64]]
    cli(*base, "--lengths", "32", "--out", tmp_path / "bare", "--no-window-baseline")
    assert list(json.loads((tmp_path / "bare" / "ppl" / "results.json").read_text())) == ["stock", "pi:factor=2"]
    assert set(json.loads((out / "ppl" / "results.json").read_text())["stock"]["ppl"]) == {"32", "64", "128"}
    with pytest.raises(ConfigError, match="other settings \\(windows differ\\)"):
        cli(*base, "--lengths", "32", "--windows", "2")


def test_cli_bad_input_fails_before_measuring(saved, tmp_path, monkeypatch):
    path, text = saved
    monkeypatch.setattr(eval_cli, "perplexity", lambda *a: pytest.fail("measured despite bad input"))
    base = ["eval", "ppl", "--model", path, "--text", text, "--out", tmp_path / "o"]
    for extra, msg in [(["--lengths", "8q"], "bad length"), (["--lengths", "32", "--methods", "pi:factor"], "key=value"),
                       (["--lengths", "32", "--methods", "pi:factor=-1"], "factor must be > 0"),
                       (["--lengths", "32", "--methods", "stock,stock"], "more than once"),
                       (["--lengths", "100k"], r"has \d+ tokens and 102400 are needed"),
                       (["--lengths", "32", "--text", tmp_path / "nope.txt"], "does not exist")]:
        with pytest.raises(ConfigError, match=msg):
            cli(*base, *extra)
    with pytest.raises(ConfigError, match="stock@window is a perplexity yardstick"):
        cli("eval", "passkey", "--model", path, "--out", tmp_path / "o", "--lengths", "300",
            "--methods", "stock,stock@window")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "ppl").mkdir()
    (tmp_path / "taken" / "ppl" / "mine.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not written by llama-ctx"):
        cli("eval", "ppl", "--model", path, "--text", text, "--out", tmp_path / "taken", "--lengths", "32")


def test_cli_passkey_and_sweep_run(saved, tmp_path, capsys):
    path, text = saved
    out = tmp_path / "out"
    cli("eval", "passkey", "--model", path, "--out", out, "--lengths", "300", "--depths", "0,1", "--trials", "1",
        "--methods", "stock,yarn:factor=4")
    assert "passkey accuracy" in capsys.readouterr().out
    cells = json.loads((out / "passkey" / "results.json").read_text())["yarn:factor=4"]["cells"]
    assert [(c["length"], c["depth"], c["trials"]) for c in cells] == [(300, 0.0, 1), (300, 1.0, 1)]
    runs = {}
    for flag in ([], ["--share-prefix"]):  # shared where exact (stock, yarn), whole prompts for dynamic-ntk
        cli("eval", "passkey", "--model", path, "--out", tmp_path / f"pk{flag}", "--lengths", "300", "--depths", "0.5",
            "--trials", "2", "--methods", "stock,yarn:factor=4,dynamic-ntk:factor=4", *flag)
        runs[bool(flag)] = json.loads((tmp_path / f"pk{flag}" / "passkey" / "results.json").read_text())
    assert runs[True] == runs[False] and len(runs[True]) == 3
    capsys.readouterr()
    cli("sweep", "--model", path, "--text", text, "--target", "128", "--methods", "pi", "--out", out)
    printed = capsys.readouterr().out
    assert "best: llama_ctx." in printed and (out / "sweep" / "sweep.csv").is_file()
    cli("sweep", "--model", path, "--text", text, "--target", "128", "--methods", "pi", "--out", out)  # resumes
    assert capsys.readouterr().out.splitlines()[:-1] == printed.splitlines()[:-1]
