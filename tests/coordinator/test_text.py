"""Streaming detokenisation: multi-byte characters split across tokens come out whole; stop
strings cut the text, also when they span chunks."""

from transformers import AutoTokenizer

from specpipe.coordinator.text import TextStream


def stream_all(tokenizer, ids, stop=(), chunk=1):
    stream = TextStream(tokenizer, [], list(stop))
    pieces = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        pieces.append(stream.push(part, final=start + chunk >= len(ids)))
        if stream.stopped:
            break
    return pieces, stream


def test_multibyte_characters_never_split(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    text = "x = '数学 ✓ naïve' # ünïcödé 🎉"
    ids = tokenizer(text)["input_ids"]
    pieces, _ = stream_all(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_across_chunks(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    ids = tokenizer("return fib(n - 1)\n    return x")["input_ids"]
    pieces, stream = stream_all(tokenizer, ids, stop=["\n    return"])
    assert stream.stopped
    assert "".join(pieces) == "return fib(n - 1)"


def test_no_stop_flushes_everything(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    ids = tokenizer("def f():\n    pass")["input_ids"]
    pieces, stream = stream_all(tokenizer, ids, stop=["zzz"], chunk=3)
    assert not stream.stopped and "".join(pieces) == "def f():\n    pass"
