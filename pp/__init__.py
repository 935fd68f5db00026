"""Async pipeline-parallel transport: one self-describing packed hop per stage step.

The functional API has the call shapes of vLLM's / sglang's ``GroupCoordinator``
(``isend_tensor_dict``, ``irecv_tensor_dict``, ``send_tensor_dict``, ``recv_tensor_dict``);
:class:`TensorDictChannel` is the object to keep for a fixed peer, with receives that return at
once. :func:`flush` waits for every pending send of the process.
"""

from .api import (
    irecv_tensor_dict,
    isend_tensor_dict,
    recv_tensor_dict,
    reset_channels,
    send_tensor_dict,
)
from .channel import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SLOT_BYTES,
    Declared,
    PendingRecv,
    TensorDictChannel,
    Wire,
)
from .stage import StageDriver
from .transport import REAPER, Handle, flush
from .wire.limits import Limits, WireError

__all__ = [
    "isend_tensor_dict",
    "irecv_tensor_dict",
    "send_tensor_dict",
    "recv_tensor_dict",
    "reset_channels",
    "flush",
    "TensorDictChannel",
    "Declared",
    "PendingRecv",
    "Wire",
    "Handle",
    "REAPER",
    "Limits",
    "WireError",
    "DEFAULT_SLOT_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "StageDriver",
]
