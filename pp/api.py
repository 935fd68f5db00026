"""vLLM / sglang ``GroupCoordinator``-shaped functions over per-peer channels.

``isend_tensor_dict`` / ``irecv_tensor_dict`` keep the call shapes engines use today (the async
receive returns ``(dict, handles, postprocess)``); each (group, peer) pair gets one
:class:`~pipepack.pp.channel.TensorDictChannel` behind the scenes, which keeps the schema caches
that let a hop carry only shapes and small values in its header.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from .channel import TensorDictChannel
from .transport import Handle

__all__ = [
    "isend_tensor_dict",
    "irecv_tensor_dict",
    "send_tensor_dict",
    "recv_tensor_dict",
    "channel_for",
    "reset_channels",
]

_CHANNELS: dict[tuple, TensorDictChannel] = {}
_LOCK = threading.Lock()


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def _alone(group: dist.ProcessGroup) -> bool:
    return not dist.is_initialized() or dist.get_world_size(group) == 1


def channel_for(
    peer: int,
    *,
    group: dist.ProcessGroup | None = None,
    cpu_group: dist.ProcessGroup | None = None,
    all_gather_group: dist.ProcessGroup | None = None,
    allow_pickle: bool = False,
) -> TensorDictChannel:
    """The channel the functional API uses for ``peer`` (a rank within ``group``)."""
    group = _group(group)
    key = (id(group), id(cpu_group), id(all_gather_group), peer, allow_pickle)
    with _LOCK:
        ch = _CHANNELS.get(key)
        if ch is None:
            ch = TensorDictChannel(
                peer,
                group=group,
                cpu_group=cpu_group,
                all_gather_group=all_gather_group,
                allow_pickle=allow_pickle,
            )
            _CHANNELS[key] = ch
    return ch


def reset_channels() -> None:
    """Forgets every channel (and its schema caches); call after re-creating process groups."""
    with _LOCK:
        for ch in _CHANNELS.values():
            ch.close()
        _CHANNELS.clear()


def isend_tensor_dict(
    tensor_dict: Mapping[str, Any],
    dst: int | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    cpu_group: dist.ProcessGroup | None = None,
    all_gather_group: dist.ProcessGroup | None = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
    allow_pickle: bool = False,
) -> list[Handle]:
    """Posts one hop to ``dst`` (a rank within ``group``; default the next one) and returns.

    One header message (none when it fits inline with a small CPU payload) and one payload
    message per device type. The tensors are copied before this returns, so the caller may
    overwrite them at once; the handles complete when the peer has received everything, and
    nobody has to wait on them (a background reaper does).
    """
    group = _group(group)
    if _alone(group):
        return []
    if dst is None:
        dst = (dist.get_rank(group) + 1) % dist.get_world_size(group)
    ch = channel_for(
        dst,
        group=group,
        cpu_group=cpu_group,
        all_gather_group=all_gather_group,
        allow_pickle=allow_pickle,
    )
    ch.all_gather_tensors = dict(all_gather_tensors or {})
    return ch.isend(tensor_dict)


def irecv_tensor_dict(
    src: int | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    cpu_group: dist.ProcessGroup | None = None,
    all_gather_group: dist.ProcessGroup | None = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any] | None, list[Handle], list[Callable[[], None]]]:
    """Receives the next hop's header from ``src`` and posts its payload receives.

    Returns ``(dict, handles, postprocess)``: the dict's tensors are views of one buffer per
    device type and hold valid data once every handle's ``wait()`` and then every postprocess
    call (the TP all-gather and reassembly, which replace the sliced keys' values) have run.
    The slicing decisions come from the sender's header; ``all_gather_tensors`` is accepted for
    call compatibility and not needed here.
    """
    del all_gather_tensors  # the per-key decision travels in the header
    group = _group(group)
    if _alone(group):
        return None, [], []
    if src is None:
        src = (dist.get_rank(group) - 1) % dist.get_world_size(group)
    ch = channel_for(
        src,
        group=group,
        cpu_group=cpu_group,
        all_gather_group=all_gather_group,
        allow_pickle=allow_pickle,
    )
    return ch.irecv_posted()


def send_tensor_dict(
    tensor_dict: Mapping[str, Any], dst: int | None = None, **kwargs: Any
) -> Mapping[str, Any] | None:
    """Blocking-call shape of :func:`isend_tensor_dict`; still never waits for the peer.

    With a group of one rank it returns ``tensor_dict`` unchanged, as vLLM does.
    """
    group = _group(kwargs.get("group"))
    if _alone(group):
        return tensor_dict
    isend_tensor_dict(tensor_dict, dst, **kwargs)
    return None


def recv_tensor_dict(src: int | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """Receives one hop and returns the dict, ready to use (``None`` with a group of one)."""
    d, handles, post = irecv_tensor_dict(src, **kwargs)
    for h in handles:
        h.wait()
    for fn in post:
        fn()
    return d
