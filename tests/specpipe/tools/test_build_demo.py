"""The demo-pair build (specpipe/tools/build_demo.py): the mini recipe built twice (both load,
share a tokenizer, are bit-identical, record every build_info field), `specpipe build-demo` as
the one entry point, and the shipped prompts refreshed only by a full build into the shipped
folder."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe import demo_files
from specpipe.launch import cli
from specpipe.tools import build_demo

INFO_FIELDS = (
    "params_target",
    "params_draft",
    "param_ratio",
    "c",
    "t_draft_step_ms",
    "t_verify_ms",
    "acceptance_rate",
    "mean_accepted_len",
    "build_seconds",
    "sample",
    "samples",
    "python_version",
    "torch_version",
    "train_files",
    "train_files_sha256",
    "heldout_modules",
    "weights_sha256",
    "weights_bytes",
    "seed",
    "preset",
    "draft_temperature",
)
UTF8_TEXT = "naïve café — 日本語 🐍 \tdef f(x):\n    return x ** 2  # ∑ ≤ ∞\r\n"


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mini_builds(tmp_path_factory):
    """The mini recipe twice: once through the library call, once through `specpipe build-demo`."""
    folders = [tmp_path_factory.mktemp(f"mini{i}") for i in range(2)]
    infos = [build_demo.build_demo_pair(folders[0], seed=0, preset="mini", progress=False)]
    cli.main(["build-demo", "--out", str(folders[1]), "--preset", "mini"])
    infos.append(json.loads((folders[1] / "build_info.json").read_text()))
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
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "build_info.json")
    assert any(p.suffix == ".safetensors" for p in files)
    assert files == sorted(
        p.relative_to(second) for p in second.rglob("*") if p.is_file() and p.name != "build_info.json"
    )
    for path in files:
        assert _sha256(first / path) == _sha256(second / path), f"{path} differs"


def test_mini_build_info_has_every_field(mini_builds):
    folder, info = mini_builds[0][0], mini_builds[1][0]
    assert json.loads((folder / "build_info.json").read_text()) == info
    missing = [field for field in INFO_FIELDS if field not in info]
    assert not missing, f"build_info.json lacks {missing}"
    assert 0.0 <= info["acceptance_rate"] <= 1.0 and info["c"] > 0
    assert 0.0 <= info["mean_accepted_len"] <= build_demo.DRAFT_BLOCK


def test_build_demo_prints_the_summary(mini_builds):
    folder, info = mini_builds[0][1], mini_builds[1][1]
    lines = build_demo.summary_lines(info, folder)
    assert lines[-1] == f"built in {info['build_seconds']:.0f} s into {folder}"
    assert any(line.startswith("c = t_draft_step / t_verify") for line in lines)


def test_only_a_full_build_into_the_shipped_folder_refreshes_the_shipped_prompts(tmp_path, monkeypatch):
    shipped, prompts = tmp_path / "assets" / "demo", tmp_path / "assets" / "prompts" / "heldout.json"
    monkeypatch.setattr(demo_files, "DEMO_DIR", shipped.resolve())
    monkeypatch.setattr(demo_files, "PROMPTS_PATH", prompts)
    for folder in (shipped, tmp_path / "elsewhere"):
        folder.mkdir(parents=True)
        (folder / "heldout.json").write_text(f'[{{"prompt": "{folder.name}"}}]\n')
    assert not build_demo.refresh_shipped_prompts(tmp_path / "elsewhere", "full")
    assert not build_demo.refresh_shipped_prompts(shipped, "mini")
    assert not prompts.exists()
    assert build_demo.refresh_shipped_prompts(shipped, "full")
    assert prompts.read_bytes() == (shipped / "heldout.json").read_bytes()
