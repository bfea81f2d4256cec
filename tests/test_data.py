"""llama_ctx.data: token-share mixture, length upsampling, filters, grouping, packing, budget, determinism.

Every check measures the emitted examples with the test's own bookkeeping (disjoint vocabularies per source and
kind, document-id words, hand-computed shares), not with the pipeline's counters.
"""

import math
import random
from collections import Counter

import pytest
import torch
from conftest import tiny_model
from data_corpus import text_of, vocab_words, word_tokenizer, write_jsonl

import llama_ctx
from llama_ctx import ConfigError
from llama_ctx.data import DataConfig, Pipeline, as_config, block_mask, build, segment_ids, steps_for_budget
from llama_ctx.data.filters import repeated_line_share, symbol_share

PAD = 1  # word_tokenizer's <pad>


def segments(ex):
    """(start, end) of every document/piece of an example, found from position restarts; the trailing padding
    run (all <pad>) is left out."""
    pos, ids = ex["position_ids"], ex["input_ids"]
    starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
    runs = list(zip(starts, starts[1:]))
    if runs and all(i == PAD for i in ids[runs[-1][0]:runs[-1][1]]):
        runs.pop()
    return runs


# ---- mixture: token shares and per-domain long upsampling --------------------------------------------------

# source -> (long docs, long length range, short docs, short length range); lengths in words
SPEC = {"code": (20, (300, 700), 300, (5, 150)),
        "books": (10, (400, 1200), 100, (20, 190)),
        "web": (6, (250, 400), 400, (10, 100))}
SEQ = 512


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Three jsonl sources; each (source, kind) writes its own 20 words, so a token tells where it came from."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    words, owner, natural = [], {}, {}
    for src, (n_long, long_range, n_short, short_range) in SPEC.items():
        rows, toks = [], Counter()
        for kind, n, (lo, hi) in (("long", n_long, long_range), ("short", n_short, short_range)):
            vocab = vocab_words(f"{src}{kind[0]}", 20)
            words += vocab
            for _ in range(n):
                length = rng.choice([k for k in range(lo, hi + 1) if (k + 2) % SEQ != 1])  # no EOS-only piece
                rows.append({"text": text_of(rng, vocab, length)})
                toks[kind] += length + 2  # BOS and EOS
        rng.shuffle(rows)
        write_jsonl(root / f"{src}.jsonl", rows)
        natural[src] = toks["long"] / (toks["long"] + toks["short"])
    tok = word_tokenizer(words)
    for w in words:
        owner[tok.convert_tokens_to_ids(w)] = (w.rstrip("0123456789")[:-1], "long" if w.rstrip("0123456789")[-1] == "l"
                                               else "short")
    return root, tok, owner, natural


def measure(examples, owner):
    """Tokens per (source, kind): each document/piece is attributed by its first word token."""
    tokens = Counter()
    for ex in examples:
        for a, b in segments(ex):
            who = next(owner[i] for i in ex["input_ids"][a:b] if i in owner)
            tokens[who] += b - a
    return tokens


def sources_cfg(root, weights=(5, 3, 2)):
    return [dict(path=str(root / f"{s}.jsonl"), domain=s, weight=w) for s, w in zip(SPEC, weights)]


def test_token_shares_and_long_upsampling_per_domain(mixture):
    root, tok, owner, natural = mixture
    cfg = dict(sources=sources_cfg(root), tokens=400_000, seed=3, shuffle_buffer=16,
               upsample=dict(threshold=200, long_share={"code": 0.7, "books": 0.9}))
    tokens = measure(build(cfg, tok, SEQ), owner)
    total = sum(tokens.values())
    for src, want in zip(SPEC, (0.5, 0.3, 0.2)):  # weights 5:3:2 are shares of tokens
        got = (tokens[src, "long"] + tokens[src, "short"]) / total
        assert abs(got - want) <= 0.02, (src, got, want)
    for src, want in (("code", 0.7), ("books", 0.9)):
        got = tokens[src, "long"] / (tokens[src, "long"] + tokens[src, "short"])
        assert natural[src] < want - 0.2  # the corpus has far fewer long tokens: they must be repeated
        assert abs(got - want) <= 0.02, (src, got, want)
    web = tokens["web", "long"] / (tokens["web", "long"] + tokens["web", "short"])
    assert abs(web - natural["web"]) <= 0.03  # no long_share: the natural mix (~8%)


def test_short_share_sets_the_long_share_of_the_other_domains(mixture):
    root, tok, owner, _ = mixture
    cfg = dict(sources=sources_cfg(root), tokens=250_000, shuffle_buffer=16, short_share=0.3,
               upsample=dict(threshold=200, long_share={"code": 0.8}))
    # code gives 0.5 * 0.2 = 0.1 short; books and web (weight 0.5 together) give the other 0.2: long share 0.6
    assert as_config(cfg).long_shares() == pytest.approx({"code": 0.8, "books": 0.6, "web": 0.6})
    tokens = measure(build(cfg, tok, SEQ), owner)
    short = sum(v for (_, kind), v in tokens.items() if kind == "short") / sum(tokens.values())
    assert abs(short - 0.3) <= 0.02
    for src in ("books", "web"):
        assert abs(tokens[src, "long"] / (tokens[src, "long"] + tokens[src, "short"]) - 0.6) <= 0.02


def test_equal_weights_are_equal_token_shares_not_document_shares(mixture):
    """The reason for the token scheduler: per-document probabilities (interleave_datasets) of 1/3 each would
    give each source a token share proportional to its mean document length, far from 1/3 here."""
    root, tok, owner, _ = mixture
    mean_len = {s: sum((lo + hi) / 2 * n for n, (lo, hi) in ((SPEC[s][0], SPEC[s][1]), (SPEC[s][2], SPEC[s][3])))
                / (SPEC[s][0] + SPEC[s][2]) for s in SPEC}
    per_document = [mean_len[s] / sum(mean_len.values()) for s in SPEC]
    assert max(abs(p - 1 / 3) for p in per_document) > 0.1
    tokens = measure(build(dict(sources=sources_cfg(root, (1, 1, 1)), tokens=150_000), tok, SEQ),
                     owner)
    shares = [sum(v for (s, _), v in tokens.items() if s == src) / sum(tokens.values()) for src in SPEC]
    assert shares == pytest.approx([1 / 3] * 3, abs=0.02)


# ---- filters --------------------------------------------------------------------------------------------------


def plain_symbol_share(text):
    visible = [c for c in text if not c.isspace()]
    return sum(not (c.isalnum() or c == "_") for c in visible) / len(visible)


def test_filter_definitions():
    assert symbol_share("ab !?") == pytest.approx(0.5) == plain_symbol_share("ab !?")
    assert symbol_share("héllo wörld_1") == 0 == plain_symbol_share("héllo wörld_1")
    assert symbol_share("   ") == 0
    assert repeated_line_share("a\n\nb\na\n a \nc") == pytest.approx(2 / 5)  # lines a b a a c: 2 repeats
    assert repeated_line_share("one line") == 0


def test_each_filter_removes_what_it_should_and_keeps_the_rest(tmp_path):
    clean = [f"d{i} " + " ".join(f"w{j}" for j in range(i, i + 8)) for i in range(6)]
    docs = {  # id word -> (text, expected fate)
        **{f"d{i}": (t, "kept") for i, t in enumerate(clean)},
        "s1": ("s1 " + "@#$%&*" * 5 + " w1 w2", "symbols"),           # 30 symbols of 36 visible
        "s2": ("s2 w1 w2 w3 w4 w5 w6 w7 (w8).", "kept"),              # 3 symbols of 26
        "r1": ("r1 intro\nmenu\nmenu\nmenu\nmenu", "repeated_lines"),  # 3 of 5 lines repeat: 0.6
        "r2": ("r2 intro\nmenu\nmenu\nother w1", "kept"),             # 1 of 4: 0.25
        "t1": ("t1 w1", "too_short"),                                 # 5 characters < 20
    }
    assert plain_symbol_share(docs["s1"][0]) > 0.5 > plain_symbol_share(docs["s2"][0])
    rows = [{"text": t} for t, _ in docs.values()]
    rows += [{"text": clean[0]}, {"text": clean[1]}, {"text": ""}, {"text": "  \n "},  # 2 exact duplicates, 2 empty
             {"text": clean[2] + " "}, {"text": "d2x" + clean[2][2:]}]  # near-duplicates stay
    words = vocab_words("w", 20) + list(docs) + [f"d{i}" for i in range(6)] + ["d2x", "intro", "menu", "other"]
    tok = word_tokenizer(words)
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    cfg = dict(sources=[dict(path=str(path), domain="web", weight=1)], shuffle_buffer=0,
               filters=dict(min_chars=20, max_symbol_share=0.5, max_repeated_line_share=0.5, dedup=True))
    pipe = Pipeline(cfg, tok, 64)
    seen = Counter()
    for packed in pipe:
        for a, b in segments(packed.example):
            seen[tok.convert_ids_to_tokens(packed.example["input_ids"][a + 1])] += 1  # the id word after BOS
    expected = Counter({k: 1 for k, (_, fate) in docs.items() if fate == "kept"}) + Counter({"d2": 1, "d2x": 1})
    assert seen == expected  # d2 twice (the copy with a trailing space is not an exact duplicate)
    fates = Counter(fate for _, fate in docs.values())
    counts = pipe.sources[0].counts()
    assert counts == dict(documents=len(rows), symbols=fates["symbols"], repeated_lines=fates["repeated_lines"],
                          duplicate=2, empty=2, groups=len(rows) - 6, too_short=fates["too_short"],
                          kept=sum(expected.values()))


def test_dedup_is_exact_and_per_source(tmp_path):
    tok = word_tokenizer(["a", "b"])
    rows = [{"text": "a b"}, {"text": "a b"}, {"text": "a  b"}, {"text": "b a"}]
    p1, p2 = write_jsonl(tmp_path / "1.jsonl", rows), write_jsonl(tmp_path / "2.jsonl", rows[:1])
    cfg = dict(sources=[dict(path=str(p1), domain="x", weight=3), dict(path=str(p2), domain="y", weight=1)],
               shuffle_buffer=0)
    pipe = Pipeline(cfg, tok, 16)
    list(pipe)
    assert pipe.sources[0].counts()["duplicate"] == 1 and pipe.sources[0].counts()["kept"] == 3
    assert pipe.sources[1].counts()["kept"] == 1  # the same text in another source is kept
    pipe = Pipeline({**cfg, "filters": {"dedup": False}}, tok, 16)
    list(pipe)
    assert pipe.sources[0].counts()["kept"] == 4


# ---- grouping ------------------------------------------------------------------------------------------------


def documents(ds_or_pipe):
    """Token-id tuples of every whole document in the examples (nothing split in these tests)."""
    out = Counter()
    for ex in ds_or_pipe:
        ex = getattr(ex, "example", ex)
        for a, b in segments(ex):
            out[tuple(ex["input_ids"][a:b])] += 1
    return out


def test_group_by_dir_file_and_field(tmp_path):
    rng = random.Random(1)
    words = vocab_words("w", 30)
    tok = word_tokenizer(words)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = lambda text: tuple(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    files = {"repos/r1/b.txt": text_of(rng, words, 7), "repos/r1/a/x.txt": text_of(rng, words, 5),
             "repos/r2/c.txt": text_of(rng, words, 4), "repos/top.txt": text_of(rng, words, 3)}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    src = dict(path=str(tmp_path / "repos"), domain="code", weight=1, group_by="dir")
    got = documents(build(dict(sources=[src], shuffle_buffer=0), tok, 128))
    r1 = (bos, *ids(files["repos/r1/a/x.txt"]), *ids(files["repos/r1/b.txt"]), eos)  # sorted path order
    want = Counter([r1, (bos, *ids(files["repos/r2/c.txt"]), eos), (bos, *ids(files["repos/top.txt"]), eos)])
    assert got == want

    rows = [dict(text=text_of(rng, words, 3), book=b) for b in ("b1", "b1", "b2", "b1", None, None)]
    path = write_jsonl(tmp_path / "books.jsonl", rows)
    src = dict(path=str(path), domain="books", weight=1, group_by="book")
    got = documents(build(dict(sources=[src], shuffle_buffer=0), tok, 128))
    t = [ids(r["text"]) for r in rows]
    want = Counter([(bos, *t[0], *t[1], eos), (bos, *t[2], eos), (bos, *t[3], eos), (bos, *t[4], eos),
                    (bos, *t[5], eos)])  # only consecutive rows join; rows without a key stand alone
    assert got == want

    write_jsonl(tmp_path / "two" / "p.jsonl", rows[:2])
    write_jsonl(tmp_path / "two" / "q.jsonl", rows[2:3])
    src = dict(path=str(tmp_path / "two"), domain="books", weight=1, group_by="file")
    got = documents(build(dict(sources=[src], shuffle_buffer=0), tok, 128))
    assert got == Counter([(bos, *t[0], *t[1], eos), (bos, *t[2], eos)])


def test_table_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(4)
    words = vocab_words("w", 30)
    tok = word_tokenizer(words)
    texts = [text_of(rng, words, rng.randint(1, 20)) for _ in range(25)]
    write_jsonl(tmp_path / "t.jsonl", [{"body": t, "n": i} for i, t in enumerate(texts)])
    pq.write_table(pa.table({"body": texts}), tmp_path / "t.parquet", row_group_size=7)
    (tmp_path / "t.csv").write_text("body\n" + "\n".join(texts) + "\n")
    (tmp_path / "t.json").write_text("\n".join(f'{{"body": "{t}"}}' for t in texts))
    want = Counter((tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id) for t in texts)
    for suffix in ("jsonl", "parquet", "csv", "json"):
        src = dict(path=tmp_path / f"t.{suffix}", domain="x", weight=1, text_field="body")  # a Path is fine
        assert documents(build(dict(sources=[src], shuffle_buffer=0), tok, 32)) == want, suffix


# ---- packing -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packing_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    rng = random.Random(2)
    words = vocab_words("w", 200)
    lengths = [rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 62), rng.randint(63, 200)]) for _ in range(300)]
    rows = [{"text": text_of(rng, words, n)} for n in lengths]
    return write_jsonl(root / "p.jsonl", rows), rows, words


def test_packing_is_exact(packing_corpus):
    path, rows, words = packing_corpus
    tok, seq = word_tokenizer(words), 64
    cfg = dict(sources=[dict(path=str(path), domain="x", weight=1)], shuffle_buffer=8,
               filters=dict(dedup=False))  # short random documents repeat by chance
    pipe = Pipeline(cfg, tok, seq)
    examples = [p.example for p in pipe]
    docs = [[tok.bos_token_id, *tok(r["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
            for r in rows]
    # no token lost or duplicated: multiset of real tokens, and of documents/pieces (consecutive seq-long pieces)
    real = Counter(i for ex in examples for i in ex["input_ids"] if i != PAD)
    assert real == Counter(i for d in docs for i in d)
    pieces = Counter(tuple(d[k:k + seq]) for d in docs for k in range(0, len(d), seq))
    assert Counter(tuple(ex["input_ids"][a:b]) for ex in examples for a, b in segments(ex)) == pieces
    assert pipe.split_docs == sum(len(d) > seq for d in docs) > 0
    assert pipe.pieces == sum(math.ceil(len(d) / seq) for d in docs if len(d) > seq)
    for ex in examples:
        assert {len(v) for v in ex.values()} == {seq}
        runs = segments(ex)
        end = runs[-1][1]
        assert all(i == PAD for i in ex["input_ids"][end:])
        assert ex["position_ids"][end:] == list(range(seq - end))  # padding: its own run from 0
        for a, b in runs:
            assert ex["position_ids"][a:b] == list(range(b - a))
        starts = {a for a, _ in runs}
        for t in range(seq):  # a label only where the previous token is in the same document
            inside = t < end and t not in starts
            assert ex["labels"][t] == (ex["input_ids"][t] if inside else -100)
    # best fit (online, a few sequences of look-ahead) packs tighter than filling sequences in arrival order, and
    # within 5% of first-fit decreasing over the whole corpus at once (offline)
    greedy, room, ffd = 1, seq, []
    for n in (len(p) for p in pieces.elements()):
        greedy, room = (greedy, room - n) if n <= room else (greedy + 1, seq - n)
    for n in sorted((len(p) for p in pieces.elements()), reverse=True):
        k = next((k for k, used in enumerate(ffd) if used + n <= seq), None)
        ffd.append(n) if k is None else ffd.__setitem__(k, ffd[k] + n)
    assert len(examples) < greedy and len(examples) <= 1.05 * len(ffd)


def test_packed_forward_equals_separate_forwards(tmp_path):
    """sdpa and eager: transformers' packed-sequence detection (attention_mask=None, use_cache=False) and our
    block_mask each give every document's own logits, and the loss only inside documents."""
    rng = random.Random(3)
    words = vocab_words("w", 200)
    tok = word_tokenizer(words, bos=False, eos=False)  # one-word documents are one token long
    rows = [{"text": text_of(rng, words, n)} for n in [1, 1, 5, 1, 30, 70, 2, 64, 13, 1, 40, 9, 20]]
    cfg = dict(sources=[dict(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), domain="x", weight=1)],
               pack_buffer=1, shuffle_buffer=0)
    examples = list(build(cfg, tok, 64))
    hand = dict(input_ids=[5, 6, 7, 8, 9, PAD], position_ids=[0, 0, 0, 1, 2, 0], labels=[-100, -100, -100, 8, 9, -100])
    examples.append({k: v + [PAD if k == "input_ids" else (v[-1] + 1 if k == "position_ids" else -100)
                             for _ in range(58)] for k, v in hand.items()})  # 1-token docs back to back, padding
    batch = {k: torch.tensor([ex[k] for ex in examples]) for k in examples[0]}
    lens = [b - a for ex in examples for a, b in segments(ex)]
    assert 1 in lens and 64 in lens
    for impl in ("sdpa", "eager"):
        model = tiny_model(attn_implementation=impl)
        with torch.no_grad():
            packed = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                           use_cache=False)
            masked = model(batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=block_mask(batch["position_ids"]))
            plain = model(batch["input_ids"], use_cache=False).logits
            nll, count, worst, worst_plain = 0.0, 0, 0.0, 0.0
            for r, ex in enumerate(examples):
                for a, b in segments(ex):
                    alone = model(batch["input_ids"][r:r + 1, a:b], use_cache=False).logits[0]
                    worst = max(worst, (packed.logits[r, a:b] - alone).abs().max().item(),
                                (masked.logits[r, a:b] - alone).abs().max().item())
                    worst_plain = max(worst_plain, (plain[r, a:b] - alone).abs().max().item())
                    if b - a > 1:
                        nll += torch.nn.functional.cross_entropy(alone[:-1], batch["input_ids"][r, a + 1:b],
                                                                 reduction="sum").item()
                        count += b - a - 1
        assert worst <= 1e-5, (impl, worst)
        assert worst_plain > 1e-2  # control: without restarting positions the documents do mix
        assert abs(packed.loss.item() - nll / count) <= 1e-5


def test_block_mask_matches_a_written_out_mask():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0], [0, 1, 2, 3, 4, 5, 6]])
    doc = [[0, 0, 0, 1, 2, 2, 3], [0] * 7]
    assert segment_ids(pos).tolist() == doc
    m = block_mask(pos, torch.float32)
    assert m.shape == (2, 1, 7, 7)
    for b in range(2):
        for i in range(7):
            for j in range(7):
                ok = j <= i and doc[b][i] == doc[b][j]
                assert m[b, 0, i, j].item() == (0.0 if ok else torch.finfo(torch.float32).min)


def test_document_tokenizer_fast_path_gives_the_tokenizers_own_ids():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llama_ctx.data.mixture import DocTokenizer

    texts = ["Grüße aus Köln: naïve café, 東京 and emoji 🙂!", "def f(x):\n    return x ** 2  # </s> inside",
             "plain words " * 50, " leading space", ""]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    for split in (False, True):  # split_special_tokens: a literal "</s>" in a text is EOS, or plain characters
        tok.split_special_tokens = split
        got = DocTokenizer(tok)(texts)
        want = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in texts]
        assert [g.tolist() for g in got] == want and tok.decode(got[0][1:-1]) == texts[0]
        assert (tok.eos_token_id in got[1][1:-1].tolist()) != split


# ---- budget, determinism, resume ---------------------------------------------------------------------------


def test_budget_stops_the_stream_and_sets_steps(packing_corpus):
    path, _, words = packing_corpus
    tok = word_tokenizer(words)
    src = [dict(path=str(path), domain="x", weight=1)]
    assert len(list(build(dict(sources=src, tokens=5000), tok, 64))) == 79  # ceil(5000 / 64) = 79 > one pass
    assert len(list(build(dict(sources=src, tokens="2e3"), tok, 64))) == 32
    assert steps_for_budget(10**9, 65536, 8) == 1907  # ceil(1e9 / 65536) = 15259 examples, // 8
    assert steps_for_budget(5000, 64, 8) == 9
    with pytest.raises(ConfigError, match="less than one global batch"):
        steps_for_budget(100, 64, 8)


def test_deterministic_and_resumable(mixture):
    root, tok, _, _ = mixture
    cfg = dict(sources=sources_cfg(root), tokens=40 * SEQ, upsample=dict(threshold=200, long_share=0.5))
    full = list(build(cfg, tok, SEQ))
    assert len(full) == 40 and list(build(cfg, tok, SEQ)) == full
    assert list(build({**cfg, "seed": 1}, tok, SEQ)) != full
    assert list(build(cfg, tok, SEQ).skip(17)) == full[17:]
    ds = build(cfg, tok, SEQ)
    for n, _ in enumerate(ds, 1):
        if n == 25:
            state = ds.state_dict()
            break
    resumed = build(cfg, tok, SEQ)
    resumed.load_state_dict(state)
    assert list(resumed) == full[25:]


# ---- config --------------------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    src = dict(path=str(good), domain="web", weight=1)
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]: unknown key 'weigth'; did you mean 'weight'"):
        as_config(dict(sources=[dict(path=str(good), domain="web", weigth=1)]))
    with pytest.raises(ConfigError, match=r"data\.filters: unknown key 'min_char'; did you mean 'min_chars'"):
        as_config(dict(sources=[src], filters=dict(min_char=3)))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight: Input should be greater than 0"):
        as_config(dict(sources=[{**src, "weight": 0}]))
    with pytest.raises(ConfigError, match=r"data\.tokens: must be a number"):
        as_config(dict(sources=[src], tokens="lots"))
    with pytest.raises(ConfigError, match="long_share names domain 'wbe', which no source has; did you mean 'web'"):
        as_config(dict(sources=[src], upsample=dict(threshold=8, long_share={"wbe": 0.5})))
    with pytest.raises(ConfigError, match="short_share needs upsample.threshold"):
        as_config(dict(sources=[src], short_share=0.4))
    with pytest.raises(ConfigError, match="cannot be reached"):
        as_config(dict(sources=[src, {**src, "domain": "code"}], short_share=0.9,
                       upsample=dict(threshold=8, long_share={"web": 0.5})))
    missing = dict(sources=[src, dict(path=str(tmp_path / "nope.jsonl"), domain="x", weight=1)])
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.path: '.*nope\.jsonl' does not exist"):
        build(missing, word_tokenizer(["a"]), 16)
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.text_field: .* has no column 'body'"):
        list(build(dict(sources=[{**src, "text_field": "body"}]), word_tokenizer(["a"]), 16))
    with pytest.raises(ConfigError, match="no document longer than 50 tokens"):
        list(build(dict(sources=[src], upsample=dict(threshold=50, long_share=0.5)), word_tokenizer(["a"]), 16))
    with pytest.raises(ConfigError, match="seq_len must be an integer >= 2"):
        build(dict(sources=[src]), word_tokenizer(["a"]), 1)
    assert as_config(dict(sources=[src], tokens="1e9")).tokens == 10**9 == as_config(dict(sources=[src],
                                                                                          tokens="1B")).tokens
    assert as_config(dict(sources=[src], tokens=2.5e8)).tokens == 250_000_000
    assert isinstance(as_config(DataConfig(sources=[src])), DataConfig) and llama_ctx.data.build is build


def test_readme_data_section_is_valid():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("data:"))
    cfg = as_config(yaml.safe_load(block)["data"])
    assert cfg.tokens == 10**9 and cfg.long_shares() == pytest.approx({"books": 0.8, "code": 0.8, "web": 0.3})
