"""`llama-ctx data summary|preview` on a generated corpus and a tokenizer saved from code."""

import json
import random
from collections import Counter

import pytest
import yaml
from data_corpus import text_of, vocab_words, word_tokenizer, write_jsonl

from llama_ctx.cli import main
from llama_ctx.data import summary


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    words = {"code": vocab_words("c", 30), "web": vocab_words("x", 30)}
    write_jsonl(root / "code.jsonl", [{"text": text_of(rng, words["code"], rng.choice([20, 400]))} for _ in range(60)]
                + [{"text": "@@@ ### $$$ %%% c1"}])
    write_jsonl(root / "web.jsonl", [{"content": text_of(rng, words["web"], rng.randint(5, 60))} for _ in range(200)])
    tok = word_tokenizer(words["code"] + words["web"])
    tok.save_pretrained(root / "tok")
    config = {"model": {"path": str(root / "tok")}, "training": {"seq_len": 128, "learning_rate": 1e-4},
              "data": {"sources": [{"path": str(root / "code.jsonl"), "domain": "code", "weight": 3},
                                   {"path": str(root / "web.jsonl"), "domain": "web", "weight": 1,
                                    "text_field": "content"}],
                       "tokens": "1e9", "upsample": {"threshold": 100, "long_share": {"code": 0.8}},
                       "filters": {"max_symbol_share": 0.5}}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path, config, tok


def test_summary_reports_what_the_stream_holds(setup, capsys):
    root, path, config, tok = setup
    out = root / "summary"
    assert main(["data", "summary", "--config", str(path), "--sample-tokens", "20k", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "packing efficiency" in text and "requested" in text and "symbols 1" in text
    result = json.loads((out / "summary.json").read_text())
    assert (out / "doc_lengths.png").stat().st_size > 1000
    assert result["examples"] == 157  # ceil(20000 / 128)
    # the same examples, measured here: tokens per domain by vocabulary, padding by <pad>
    from llama_ctx.data import build

    examples = list(build(config["data"], tok, 128).take(157))
    domain = {tok.convert_tokens_to_ids(w): w[0] for w in tok.get_vocab() if w[0] in "cx" and w[1:].isdigit()}
    tokens, pad = Counter(), 0
    for ex in examples:
        starts = [t for t, p in enumerate(ex["position_ids"]) if p == 0] + [128]
        for a, b in zip(starts, starts[1:]):
            ids = ex["input_ids"][a:b]
            if all(i == tok.pad_token_id for i in ids):
                pad += b - a
            else:
                tokens[next(domain[i] for i in ids if i in domain)] += b - a
    real = tokens.total()
    assert result["real_tokens"] == real and result["packing_efficiency"] == pytest.approx(real / (157 * 128))
    assert result["domains"]["code"]["realised_share"] == pytest.approx(tokens["c"] / real)
    assert result["domains"]["code"]["requested_share"] == 0.75
    assert abs(tokens["c"] / real - 0.75) <= 0.02
    assert result["sources"][0]["filters"]["symbols"] == 1
    firsts = sum(ex["input_ids"][t] == tok.bos_token_id for ex in examples for t in range(128))  # documents
    assert sum(sum(c) for c in result["histogram"]["counts"].values()) == result["documents"] == firsts
    direct = summary(config["data"], tok, 128, sample_tokens=20_000, progress=False)
    assert direct["domains"] == result["domains"]


def test_preview_marks_document_boundaries(setup, capsys):
    _, path, _, _ = setup
    assert main(["data", "preview", "--config", str(path), "-n", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== example") == 2 and "=== example 0:" in out and "--- [0:" in out
    assert "doc 1: " in out and ".jsonl:" in out


def test_cli_errors_are_one_line_without_traceback(setup, tmp_path, capsys):
    config = setup[2]
    assert main(["data", "summary", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "data": {**config["data"], "sorces": []}}))
    assert main(["data", "preview", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sorces'; did you mean 'sources'" in err and "Traceback" not in err
    no_len = tmp_path / "nolen.yaml"
    no_len.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "training"}))
    assert main(["data", "preview", "--config", str(no_len)]) == 2
    assert "give --seq-len" in capsys.readouterr().err
