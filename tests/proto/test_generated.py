"""The checked-in generated code is exactly what proto/generate.py produces from the .proto files."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for source, _ in generate.SOURCES:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
    for path in generate.generate(tmp_path):
        checked_in = REPO / "proto" / path.relative_to(tmp_path)
        assert checked_in.read_text() == path.read_text(), f"{checked_in} is stale: run `make proto`"
