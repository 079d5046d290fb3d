"""The tensor wire codec and the ZeroMQ framing of worker messages (DESIGN §3).

A message is [protobuf bytes, tensor frame 0, tensor frame 1, ...]. A `worker_pb2.Tensor` header
names dtype, shape and frame index; the frame holds the raw bytes. Nothing is ever pickled.
Malformed input (bad protobuf, unknown dtype, a size that does not match the shape, a frame
index out of range, an oversized message) raises WireError, which the receiver logs and drops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from specpipe.proto.specpipe.worker.v1 import worker_pb2

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Largest message a worker accepts (all frames together). A q block for a 256k vocabulary and
# 16 draft tokens is 16 MiB; anything far past that is a wrong peer or garbage.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class WireError(ValueError):
    """A message that cannot be decoded: logged and dropped by the receiver, never fatal."""


def put_tensor(header: worker_pb2.Tensor, tensor: torch.Tensor, frames: list[bytes]) -> None:
    """Fill `header` for `tensor` and append its bytes to `frames`."""
    tensor = tensor.detach().contiguous().cpu()
    header.dtype = DTYPE_NAMES[tensor.dtype]
    header.shape[:] = list(tensor.shape)
    header.frame = len(frames)
    # bfloat16 has no numpy dtype: move its bytes as int16.
    view = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    frames.append(view.numpy().tobytes())


def get_tensor(header: worker_pb2.Tensor, frames: list[bytes]) -> torch.Tensor:
    if header.dtype not in DTYPES:
        raise WireError(f"unknown tensor dtype {header.dtype!r}")
    if header.frame >= len(frames):
        raise WireError(f"tensor frame {header.frame} missing: message has {len(frames)} frames")
    dtype = DTYPES[header.dtype]
    shape = tuple(header.shape)
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    data = frames[header.frame]
    if len(data) != expected:
        raise WireError(f"tensor frame holds {len(data)} bytes, shape {shape} {header.dtype} needs {expected}")
    numpy_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def encode(message, frames: list[bytes] | None = None) -> list[bytes]:
    """[serialized message, *frames] ready for `socket.send_multipart`."""
    return [message.SerializeToString(), *(frames or [])]


def decode(message_type, parts: list[bytes]):
    """Parse [message bytes, *frames] into (message, frames); WireError on anything malformed."""
    if not parts:
        raise WireError("empty message")
    if sum(len(p) for p in parts) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {sum(len(p) for p in parts)} bytes exceeds {MAX_MESSAGE_BYTES}")
    message = message_type()
    try:
        message.ParseFromString(parts[0])
    except Exception as err:  # protobuf raises DecodeError, and others on some garbage
        raise WireError(f"cannot parse {message_type.__name__}: {err}") from err
    if message.WhichOneof("kind") is None:
        raise WireError(f"{message_type.__name__} with no kind set")
    return message, list(parts[1:])
