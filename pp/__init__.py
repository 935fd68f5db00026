"""Async pipeline-parallel transport: one header and one payload per stage hop.

The functional API has the call shapes of vLLM's / sglang's ``GroupCoordinator``
(``isend_tensor_dict``, ``irecv_tensor_dict``, ``send_tensor_dict``, ``recv_tensor_dict``);
:class:`TensorDictChannel` is the object to keep for a fixed peer, with receives that return at
once and declared layouts that need no header message.
"""

from .api import (
    channel_for,
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
)
from .stage import StageDriver
from .transport import REAPER, Handle
from .wire import Limits, WireError

__all__ = [
    "isend_tensor_dict",
    "irecv_tensor_dict",
    "send_tensor_dict",
    "recv_tensor_dict",
    "channel_for",
    "reset_channels",
    "TensorDictChannel",
    "Declared",
    "PendingRecv",
    "Handle",
    "REAPER",
    "Limits",
    "WireError",
    "DEFAULT_SLOT_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "StageDriver",
]
