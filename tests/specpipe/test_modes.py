"""The one Mode enum (specpipe/modes.py): exactly the proto's modes, in its order, round-tripping
through the proto's values; MODE_UNSPECIFIED reads as "no mode" and an undefined number is an
error; a member is spelled (flags, logs, JSON) as its lower-case name."""

import json

import pytest

from specpipe.modes import MODE_NAMES, Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2


def test_members_are_the_protos_modes_in_its_order():
    proto = [(name, value) for name, value in specpipe_pb2.Mode.items() if value != specpipe_pb2.MODE_UNSPECIFIED]
    assert [(f"MODE_{mode.name}", mode.proto) for mode in Mode] == proto
    assert MODE_NAMES == ("autoregressive", "sequential", "pipelined", "specbranch")
    assert Mode.SPECBRANCH.proto == specpipe_pb2.MODE_SPECBRANCH


@pytest.mark.parametrize("mode", list(Mode))
def test_round_trips_through_the_proto_and_the_spelling(mode):
    assert Mode.from_proto(mode.proto) is mode
    assert Mode(mode.value) is mode and Mode(mode) is mode
    assert str(mode) == f"{mode}" == "%s" % mode == mode.value == mode.name.lower()
    assert json.loads(json.dumps({"mode": mode})) == {"mode": mode.value}


def test_unspecified_is_no_mode_and_unknown_numbers_and_names_are_errors():
    assert Mode.from_proto(specpipe_pb2.MODE_UNSPECIFIED) is None
    with pytest.raises(ValueError, match="99 is not a known Mode"):
        Mode.from_proto(99)
    with pytest.raises(ValueError):
        Mode("turbo")
