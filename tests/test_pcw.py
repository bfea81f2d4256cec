"""Parallel context windows: the layout, windows equal to running alone, score/generate vs direct computation."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from llama_ctx import ConfigError, pcw
from conftest import tiny_model

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}  # 64 ids


@pytest.fixture(scope="module")
def tokenizer():
    """Offline word-level tokenizer: "w5 w7" -> [<s>, w5, w7]."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def small_model(impl="sdpa"):
    model = tiny_model(attn_implementation=impl, vocab_size=len(VOCAB))
    with torch.no_grad():  # sharper attention than the random init, so that a wrong position or mask shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    model.generation_config.eos_token_id = None  # compare fixed lengths
    return model


def text(seed, n):
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 61, (n,), generator=g).tolist())


CONTEXTS = [text(1, 20), text(2, 13), text(3, 27)]
PROMPT = text(4, 6)


def test_prepare_layout_written_out():
    out = pcw.prepare([[5, 6, 7], [8, 9]], [10, 11])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 3, 4]]
    visible = torch.tensor([  # rows: queries, columns: keys
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = out["attention_mask"]
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0] == 0, visible) and (mask[0, 0][~visible] == torch.finfo(torch.float32).min).all()
    tensors = pcw.prepare([torch.tensor([5, 6, 7]), torch.tensor([8, 9])], torch.tensor([10, 11]))
    assert all(torch.equal(tensors[k], out[k]) for k in out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_each_window_equals_that_window_alone(impl):
    model = small_model(impl)
    windows = [[1, *torch.randint(3, 64, (n,)).tolist()] for n in (20, 9, 31)]
    x = pcw.prepare(windows, [4, 5, 6])
    hidden = model(**x, output_hidden_states=True).hidden_states
    start = 0
    for w in windows:
        alone = model(torch.tensor([w]), output_hidden_states=True).hidden_states
        for h_pcw, h_alone in zip(hidden, alone):
            torch.testing.assert_close(h_pcw[0, start:start + len(w)], h_alone[0], atol=1e-5, rtol=0)
        start += len(w)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_one_window_is_the_stock_model(impl):
    model = small_model(impl)
    window, task = [1, *range(10, 40)], list(range(40, 52))
    got = model(**pcw.prepare([window], task)).logits
    stock = model(torch.tensor([window + task])).logits
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_score_equals_direct_log_probs(tokenizer, impl):
    model = small_model(impl)
    choices = [" w3", " w7 w8", " w60 w1 w2"]
    got = pcw.score(model, tokenizer, CONTEXTS, PROMPT, choices)
    windows = [tokenizer(c)["input_ids"] for c in CONTEXTS]
    task = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for value, choice in zip(got, choices):
        answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
        x = pcw.prepare(windows, task + answer)
        logp = model(**x).logits[0].log_softmax(-1)
        n = x["input_ids"].shape[1]
        expected = sum(logp[n - len(answer) - 1 + i, a] for i, a in enumerate(answer))  # token i predicted at i - 1
        torch.testing.assert_close(value, expected, atol=1e-4, rtol=0)
    assert got.shape == (3,)


class Recorder(LogitsProcessor):
    """Keeps the logits generate() sees at every step."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores[0].clone())
        return scores


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_generate_equals_step_by_step_recomputation(tokenizer, impl):
    model, recorder = small_model(impl), Recorder()
    got = pcw.generate(model, tokenizer, CONTEXTS, PROMPT, max_new_tokens=12, do_sample=False,
                       logits_processor=LogitsProcessorList([recorder]))
    windows = [tokenizer(c)["input_ids"] for c in CONTEXTS]
    task = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for step in recorder.steps:  # the full PCW forward, recomputed from scratch for every new token
        expected = model(**pcw.prepare(windows, task)).logits[0, -1]
        torch.testing.assert_close(step, expected, atol=1e-4, rtol=0)
        task.append(int(expected.argmax()))
    assert len(recorder.steps) == 12 and got == tokenizer.decode(task[-12:], skip_special_tokens=True)


def test_generate_sampling_runs_and_is_seeded(tokenizer):
    model = small_model()
    kw = dict(max_new_tokens=5, do_sample=True, top_k=10)
    torch.manual_seed(0)
    a = pcw.generate(model, tokenizer, CONTEXTS, PROMPT, **kw)
    torch.manual_seed(0)
    assert pcw.generate(model, tokenizer, CONTEXTS, PROMPT, **kw) == a


@pytest.mark.parametrize("call,match", [
    (lambda: pcw.prepare([], [1]), "non-empty list of windows"),
    (lambda: pcw.prepare([[1, 2], []], [1]), "at least one token"),
    (lambda: pcw.prepare([[1, -2]], [1]), "non-negative token ids"),
    (lambda: pcw.prepare(["w1 w2"], [1]), "tokenize strings first"),
    (lambda: pcw.prepare([[1, 2]], torch.ones(2, 2, dtype=torch.long)), "1D tensor"),
])
def test_prepare_bad_input(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_string_api_bad_input(tokenizer):
    model = small_model()
    with pytest.raises(ConfigError, match="prompt must be a non-empty string"):
        pcw.generate(model, tokenizer, CONTEXTS, "")
    with pytest.raises(ConfigError, match="list of strings"):
        pcw.score(model, tokenizer, "w1 w2", PROMPT, [" w1"])
    with pytest.raises(ConfigError, match="choices"):
        pcw.score(model, tokenizer, CONTEXTS, PROMPT, [])


@pytest.mark.parametrize("method,params", [("alibi", {}), ("t5-bias", {}), ("rerope", dict(window=8)),
                                           ("self-extend", dict(group_size=2, window=8))])
def test_methods_that_place_cached_keys_by_count_are_refused(tokenizer, method, params):
    # they put cached keys at the positions just before the first query; PCW's windows restart their positions,
    # so score/generate on top of the windows' cache would be silently wrong (alibi: logits off by 0.2)
    import llama_ctx

    model = llama_ctx.patch(small_model(), method, **params)
    with pytest.raises(ConfigError, match=f"{method}.*parallel context windows"):
        pcw.score(model, tokenizer, CONTEXTS, PROMPT, [" w1"])
    with pytest.raises(ConfigError, match=f"{method}.*parallel context windows"):
        pcw.generate(model, tokenizer, CONTEXTS, PROMPT, max_new_tokens=2)
    llama_ctx.unpatch(model)
    llama_ctx.patch(model, "learned-absolute")  # positions added at the embeddings: exact with PCW
    pcw.score(model, tokenizer, CONTEXTS, PROMPT, [" w1"])
