"""The schedules a request can run under: one `Mode` enum, derived from the proto's
`specpipe.v1.Mode` (proto/specpipe/v1/specpipe.proto), so a mode added there appears here.

Members, in the proto's order: AUTOREGRESSIVE (target only), SEQUENTIAL (draft, then verify),
PIPELINED (the draft drafts while the target verifies), SPECBRANCH (pipelined, plus branches).
MODE_UNSPECIFIED is not a mode but "the server's default": `Mode.from_proto` turns it into None.
Each member's value is its lower-case name, the spelling of flags (`--mode specbranch`) and of
logs; a Mode is also a `str`, so it equals that spelling. Code compares members
(`mode == Mode.SEQUENTIAL`), never spelled-out strings. Knows nothing of what a schedule does.
"""

from __future__ import annotations

import enum

from specpipe.proto.specpipe.v1 import specpipe_pb2

PROTO_PREFIX = "MODE_"  # the proto's enum-value prefix (proto3 style: values are package-global)
UNSPECIFIED = specpipe_pb2.MODE_UNSPECIFIED


class _Mode(str, enum.Enum):
    """The members' behaviour; the members themselves come from the proto below."""

    def __str__(self) -> str:
        return self.value

    @property
    def proto(self) -> int:
        """This mode as the proto enum's value (specpipe_pb2.MODE_...)."""
        return specpipe_pb2.Mode.Value(PROTO_PREFIX + self.name)

    @classmethod
    def from_proto(cls, value: int) -> "Mode | None":
        """The mode a proto enum value names; None for MODE_UNSPECIFIED (the server's default).
        ValueError for a number the proto does not define."""
        if value == UNSPECIFIED:
            return None
        if value not in specpipe_pb2.Mode.values():
            raise ValueError(f"{value} is not a known Mode")
        return cls[specpipe_pb2.Mode.Name(value).removeprefix(PROTO_PREFIX)]


Mode = _Mode(
    "Mode",
    [
        (name.removeprefix(PROTO_PREFIX), name.removeprefix(PROTO_PREFIX).lower())
        for name, value in specpipe_pb2.Mode.items()
        if value != UNSPECIFIED
    ],
)
Mode.__doc__ = "A request's schedule (see the module docstring); a str equal to its flag spelling."
MODE_NAMES = tuple(mode.value for mode in Mode)  # the flag spellings, in the proto's order
