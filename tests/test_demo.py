"""`llama-ctx demo` on a tiny model: the stock@window row beside stock, and a progress bar that moves once per
decoder layer of every forward (the mechanism that keeps a 90-second forward visibly alive)."""

import json

import pytest
import torch
from conftest import ids, tiny_model
from test_eval import char_tokenizer
from test_eval_window import allowed_begin, brute_loss

from llama_ctx.cli import main
from llama_ctx.demo import format_table, measure
from llama_ctx.eval.perplexity import forward_count, perplexity
from llama_ctx.eval.progress import layer_progress
from llama_ctx.eval.specs import parse_methods, with_window_baseline


class CountingBar:
    """The part of tqdm that `measure` uses, counting updates."""

    def __init__(self):
        self.total, self.n, self.labels = None, 0, []

    def refresh(self):
        pass

    def set_description(self, text):
        self.labels.append(text)

    def update(self, n=1):
        self.n += n
        return True  # as tqdm does when it redraws: the hook must not pass it on as the layer's output


def test_layer_progress_calls_back_once_per_layer_per_forward_and_observes_only(model):
    seq = ids(130)[0]
    plain = perplexity(model, seq, [96], max_context=40, context_stride=16)
    calls = []
    with layer_progress(model, lambda: calls.append(1) or True) as n_layers:  # a value, like tqdm.update
        hooked = perplexity(model, seq, [96], max_context=40, context_stride=16)
    assert n_layers == model.config.num_hidden_layers == 2
    # windows [0, 96) and [96, 130); sub-windows of 40 every 16: starts 0, 16, 32, 48, 64 (ends 40 .. 96), and 0
    assert forward_count(130, 96, max_context=40, context_stride=16) == 6
    assert len(calls) == 6 * n_layers
    assert hooked.bucket_loss == plain.bucket_loss  # hooks change nothing
    assert all(not layer._forward_hooks for layer in model.model.layers)  # and are gone
    with layer_progress(torch.nn.Linear(2, 2), lambda: pytest.fail("no layers to hook")) as n:
        assert n == 0


def test_measure_moves_the_bar_within_each_method_and_adds_the_yardstick(model):
    seq = ids(128)[0]
    specs = with_window_baseline(parse_methods("stock,pi:factor=2"))
    bar = CountingBar()
    curves, seconds = measure(model, seq, specs, 32, bar)
    # stock and pi: one forward each; stock@window (window 64, default stride 64 // 8): [0,64) [8,72) ... [64,128)
    assert bar.total == bar.n == 2 * (1 + 9 + 1)
    assert bar.labels == list(curves) == list(seconds) == ["stock", "stock@window", "pi:factor=2"]
    windowed = [brute_loss(model, seq, allowed_begin(t, 64, 8), t) for t in range(1, 128)]
    for (s, e, loss) in curves["stock@window"]:  # positions 1..127 hold windowed[p - 1]
        part = windowed[max(s, 1) - 1:e - 1]
        assert loss == pytest.approx(sum(part) / len(part), abs=1e-5)
    table = format_table(curves, 64)
    beyond = {k: sum(x for s, _, x in v if s >= 64) / 2 for k, v in curves.items()}
    row = next(line for line in table.splitlines() if line.startswith("pi:factor=2"))
    assert row.split()[-1] == f"{beyond['pi:factor=2'] - beyond['stock@window']:+.2f}"


def test_demo_command_on_a_tiny_model(tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    (tmp_path / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = ["demo", "--model", path, "--text", tmp_path / "book.txt", "--length", "128", "--bucket", "32",
            "--methods", "stock,pi:factor=2"]
    assert main([str(a) for a in [*args, "--out", tmp_path / "a"]]) == 0
    assert "stock@window" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert list(saved["bucket_loss"]) == ["stock", "stock@window", "pi:factor=2"]
    assert (tmp_path / "a" / "demo.png").stat().st_size > 1000
    assert main([str(a) for a in [*args, "--out", tmp_path / "b", "--no-window-baseline"]]) == 0
    assert list(json.loads((tmp_path / "b" / "demo.json").read_text())["bucket_loss"]) == ["stock", "pi:factor=2"]


def test_demo_defaults_follow_the_trained_window_and_bad_parameters_fail_before_any_forward(tmp_path, monkeypatch,
                                                                                            capsys):
    from llama_ctx import demo

    # SmolLM2 (T = 8192) at 14K: the configurations measured in the README; a shorter window scales them
    assert demo.default_methods(8192, 14336) == (
        "stock,pi:factor=2,yarn:factor=2,rerope:window=4096,leaky-rerope:window=4096:factor=7,"
        "self-extend:group_size=7:window=4096,dca:chunk_size=6144:local_window=2048")
    T, length = 64, 1000  # factor / group size grow past 7 where 7 would not cover the length
    specs = {s.name: s.params for s in parse_methods(demo.default_methods(T, length))}
    w, f, g = specs["leaky-rerope"]["window"], specs["leaky-rerope"]["factor"], specs["self-extend"]["group_size"]
    assert w == 32 and w + (length - w) / f <= T - 1 and (T - w) * g + w >= length
    assert specs["dca"] == {"chunk_size": 48, "local_window": 16}

    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)  # trained window 64
    char_tokenizer().save_pretrained(path)
    (tmp_path / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    base = ["demo", "--model", path, "--text", tmp_path / "book.txt", "--length", "128", "--bucket", "1"]
    # the defaults on this model, and a first bucket that is NaN in every curve (position 0 has no loss): a plot
    assert main([str(a) for a in [*base, "--out", tmp_path / "a"]]) == 0
    saved = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert list(saved["bucket_loss"])[-1] == "dca:chunk_size=48:local_window=16"
    assert (tmp_path / "a" / "demo.png").stat().st_size > 1000
    forwards = []
    monkeypatch.setattr(demo, "measure", lambda *a, **k: forwards.append(1))
    capsys.readouterr()
    # Self-Extend's window must be < T: refused at once, not after the other methods' forwards
    assert main([str(a) for a in [*base, "--methods", "stock,pi:factor=2,self-extend:group_size=4:window=100",
                                  "--out", tmp_path / "b"]]) == 2
    assert "self-extend window must be < the trained window 64" in capsys.readouterr().err
    assert forwards == [] and not (tmp_path / "b").exists()
