"""Streaming detokenisation: multi-byte characters split across tokens come out whole; stop
strings cut the text, also when they span chunks."""

from transformers import AutoTokenizer

from specpipe.coordinator.text import TextStream


def stream_all(tokenizer, ids, stop=(), chunk=1):
    stream = TextStream(tokenizer, [], list(stop))
    pieces = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
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


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_long_stream_decodes_short_windows_and_matches_a_full_decode(tiny_models):
    """Each push decodes only the new tokens and a few before them (O(n) over a generation, not
    O(n^2)), and the pieces still join to exactly the full decode, multi-byte characters included."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    text = "".join(f"def f{i}(x):\n    return x * {i}  # ünï 数 🎉\n" for i in range(60))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 1000
    for chunk in (1, 3, 7):
        counting = CountingTokenizer(tokenizer)
        pieces, _ = stream_all(counting, ids, chunk=chunk)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert max(counting.sizes) <= 4 * chunk + 16, max(counting.sizes)
