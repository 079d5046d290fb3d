"""The demo pair: the mini recipe built twice (both load, share a tokenizer, are bit-identical,
record every build_info field); without shipped assets, one build into the user cache; and the
shipped pair (loads, has the promised sizes, round-trips UTF-8, and its build_info records
c <= 0.12 and acceptance >= 0.7 for exactly these weights)."""
import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe import demo_pair

INFO_FIELDS = ("params_target", "params_draft", "param_ratio", "c", "t_draft_step_ms",
               "t_verify_ms", "acceptance_rate", "mean_accepted_len", "build_seconds", "sample",
               "samples", "python_version", "torch_version", "train_files", "train_files_sha256",
               "heldout_modules", "weights_sha256", "weights_bytes", "seed", "preset")
UTF8_TEXT = "naïve café — 日本語 🐍 \tdef f(x):\n    return x ** 2  # ∑ ≤ ∞\r\n"


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mini_builds(tmp_path_factory):
    folders = [tmp_path_factory.mktemp(f"mini{i}") for i in range(2)]
    infos = [demo_pair.build_demo_pair(folder, seed=0, preset="mini", progress=False)
             for folder in folders]
    return folders, infos


def test_mini_pair_loads_and_shares_the_tokenizer(mini_builds):
    folder = mini_builds[0][0]
    target = AutoModelForCausalLM.from_pretrained(folder / "target")
    draft = AutoModelForCausalLM.from_pretrained(folder / "draft")
    assert target.dtype == draft.dtype == torch.float32
    target_tokenizer = AutoTokenizer.from_pretrained(folder / "target")
    draft_tokenizer = AutoTokenizer.from_pretrained(folder / "draft")
    assert target_tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(target_tokenizer)
    ids = target_tokenizer(UTF8_TEXT, return_tensors="pt").input_ids
    assert target_tokenizer.decode(ids[0]) == UTF8_TEXT
    assert target(input_ids=ids).logits.shape[-1] == target.config.vocab_size


def test_mini_builds_are_bit_identical(mini_builds):
    (first, second), _ = mini_builds
    files = sorted(p.relative_to(first) for p in first.rglob("*")
                   if p.is_file() and p.name != "build_info.json")
    assert any(p.suffix == ".safetensors" for p in files)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*")
                           if p.is_file() and p.name != "build_info.json")
    for path in files:
        assert _sha256(first / path) == _sha256(second / path), f"{path} differs"


def test_mini_build_info_has_every_field(mini_builds):
    folder, info = mini_builds[0][0], mini_builds[1][0]
    assert json.loads((folder / "build_info.json").read_text()) == info
    missing = [field for field in INFO_FIELDS if field not in info]
    assert not missing, f"build_info.json lacks {missing}"
    assert 0.0 <= info["acceptance_rate"] <= 1.0 and info["c"] > 0
    assert 0.0 <= info["mean_accepted_len"] <= demo_pair.DRAFT_BLOCK


def test_without_shipped_assets_the_pair_is_built_once_into_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_pair, "DEMO_DIR", tmp_path / "not-shipped")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="build-demo"):
        demo_pair.demo_pair_dir(build_if_missing=False)
    builds = []

    def mini_build(out_dir, **kwargs):
        builds.append(out_dir)
        return build(out_dir, preset="mini", progress=False)
    build = demo_pair.build_demo_pair
    monkeypatch.setattr(demo_pair, "build_demo_pair", mini_build)
    folder = demo_pair.demo_pair_dir()
    assert folder == tmp_path / "cache" / "specpipe" / f"demo-{demo_pair.DEMO_VERSION}"
    assert (folder / "build_info.json").is_file() and (folder / "draft" / "config.json").is_file()
    assert demo_pair.demo_pair_dir(build_if_missing=False) == folder and len(builds) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch left behind


def test_shipped_pair_loads_with_the_promised_sizes():
    folder = demo_pair.demo_pair_dir(build_if_missing=False)
    assert folder == demo_pair.DEMO_DIR, "the shipped pair is missing"
    target = AutoModelForCausalLM.from_pretrained(folder / "target")
    draft = AutoModelForCausalLM.from_pretrained(folder / "draft")
    assert target.config.model_type == draft.config.model_type == "llama"
    assert target.num_parameters() >= 10_000_000
    assert 7 <= target.num_parameters() / draft.num_parameters() <= 14
    tokenizer = AutoTokenizer.from_pretrained(folder / "target")
    assert AutoTokenizer.from_pretrained(folder / "draft").get_vocab() == tokenizer.get_vocab()
    assert tokenizer.eos_token == demo_pair.EOS_TOKEN
    ids = tokenizer(UTF8_TEXT).input_ids
    assert max(ids) < target.config.vocab_size
    assert tokenizer.decode(ids) == UTF8_TEXT


def test_shipped_build_info_meets_the_targets():
    info = json.loads((demo_pair.DEMO_DIR / "build_info.json").read_text())
    assert info["preset"] == "full"
    assert info["c"] <= 0.12
    assert info["acceptance_rate"] >= 0.7
    assert info["build_seconds"] <= 900   # KL distillation runs the target per batch: ~14 min on 2 cores
    for name in ("target", "draft"):  # the figures were measured on exactly these weights
        weights = demo_pair.DEMO_DIR / name / "model.safetensors"
        assert _sha256(weights) == info["weights_sha256"][name]
    assert info["weights_bytes"] <= 60e6


def test_heldout_prompts_ship_with_their_source():
    prompts = demo_pair.load_heldout_prompts()
    assert len(prompts) == demo_pair.NUM_PROMPTS
    assert all(isinstance(p, str) and p.strip() and p.count("\n") <= 2 for p in prompts)
    entries = json.loads(demo_pair.PROMPTS_PATH.read_text())
    assert all(entry["file"] in demo_pair.HELDOUT_MODULES for entry in entries)
