"""Where the runtime finds the demo pair (specpipe/demo_pair.py, demo_files.py): without shipped
assets, one build into the user cache; and the shipped pair (loads, has the promised sizes,
round-trips UTF-8, and its build_info records c <= 0.12 and acceptance >= 0.7 for exactly these
weights).
The build itself is tested in tests/specpipe/tools/test_build_demo.py."""

import hashlib
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe import demo_files, demo_pair
from specpipe.tools import build_demo, corpus

UTF8_TEXT = "naïve café — 日本語 🐍 \tdef f(x):\n    return x ** 2  # ∑ ≤ ∞\r\n"


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_shipped_assets_the_pair_is_built_once_into_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_files, "DEMO_DIR", tmp_path / "not-shipped")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="build-demo"):
        demo_pair.demo_pair_dir(build_if_missing=False)
    builds = []

    def mini_build(out_dir, **kwargs):
        builds.append(out_dir)
        return build(out_dir, preset="mini", progress=False)

    build = build_demo.build_demo_pair
    monkeypatch.setattr(build_demo, "build_demo_pair", mini_build)
    folder = demo_pair.demo_pair_dir()
    assert folder == tmp_path / "cache" / "specpipe" / f"demo-{demo_files.DEMO_VERSION}"
    assert (folder / "build_info.json").is_file() and (folder / "draft" / "config.json").is_file()
    assert demo_pair.demo_pair_dir(build_if_missing=False) == folder and len(builds) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch left behind


def test_shipped_pair_loads_with_the_promised_sizes():
    folder = demo_pair.demo_pair_dir(build_if_missing=False)
    assert folder == demo_files.DEMO_DIR, "the shipped pair is missing"
    target = AutoModelForCausalLM.from_pretrained(folder / "target")
    draft = AutoModelForCausalLM.from_pretrained(folder / "draft")
    assert target.config.model_type == draft.config.model_type == "llama"
    assert target.num_parameters() >= 10_000_000
    assert 7 <= target.num_parameters() / draft.num_parameters() <= 14
    tokenizer = AutoTokenizer.from_pretrained(folder / "target")
    assert AutoTokenizer.from_pretrained(folder / "draft").get_vocab() == tokenizer.get_vocab()
    assert tokenizer.eos_token == corpus.EOS_TOKEN
    ids = tokenizer(UTF8_TEXT).input_ids
    assert max(ids) < target.config.vocab_size
    assert tokenizer.decode(ids) == UTF8_TEXT


def test_shipped_build_info_meets_the_targets():
    info = json.loads((demo_files.DEMO_DIR / "build_info.json").read_text())
    assert info["preset"] == "full"
    assert info["c"] <= 0.12
    assert info["acceptance_rate"] >= 0.7
    assert info["build_seconds"] <= 900  # KL distillation runs the target per batch: ~14 min on 2 cores
    for name in ("target", "draft"):  # the figures were measured on exactly these weights
        weights = demo_files.DEMO_DIR / name / "model.safetensors"
        assert _sha256(weights) == info["weights_sha256"][name]
    assert info["weights_bytes"] <= 60e6


def test_heldout_prompts_ship_with_their_source():
    prompts = demo_pair.load_heldout_prompts()
    assert len(prompts) == corpus.NUM_PROMPTS
    assert all(isinstance(p, str) and p.strip() and p.count("\n") <= 2 for p in prompts)
    entries = json.loads(demo_files.PROMPTS_PATH.read_text())
    assert all(entry["file"] in corpus.HELDOUT_MODULES for entry in entries)
