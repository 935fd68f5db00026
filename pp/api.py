"""vLLM / sglang ``GroupCoordinator``-shaped functions over the process's links.

Every call names its peer within ``group``; all calls to one (group, peer) share one link
whatever their per-call options, which travel in the hop itself. With no process group
initialised these raise (a silently dropped hop is data loss); with a group of one rank they
short-circuit as the engines do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from . import codec
from .channel import resolve_groups, tp_of
from .link import DEFAULT_CHUNK_BYTES, RecvOptions, get_link, reset_links
from .transport import Handle
from .wire.limits import DEFAULT_LIMITS

__all__ = [
    "isend_tensor_dict",
    "irecv_tensor_dict",
    "send_tensor_dict",
    "recv_tensor_dict",
    "reset_channels",
]


def _peer(group: dist.ProcessGroup, rank: int | None, step: int, what: str) -> int:
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if rank is None:
        return (me + step) % world
    if type(rank) is not int or not 0 <= rank < world or rank == me:
        raise ValueError(
            f"{what} {rank!r} is not another rank of the group: it has {world} "
            f"ranks and this is rank {me}"
        )
    return rank


def reset_channels() -> None:
    """Forgets every link (call after re-creating process groups)."""
    reset_links()


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

    The tensors are copied before this returns, so the caller may overwrite them at once; the
    handle completes once the peer received the hop, and nobody has to wait on it (a
    background reaper does; :func:`pipepack.pp.flush` waits for all of them).
    """
    return _send(
        tensor_dict,
        dst,
        group=group,
        cpu_group=cpu_group,
        all_gather_group=all_gather_group,
        all_gather_tensors=all_gather_tensors,
        allow_pickle=allow_pickle,
        blocking=False,
    )


def _send(
    tensor_dict: Mapping[str, Any],
    dst: int | None,
    *,
    blocking: bool,
    group: dist.ProcessGroup | None = None,
    cpu_group: dist.ProcessGroup | None = None,
    all_gather_group: dist.ProcessGroup | None = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
    allow_pickle: bool = False,
) -> Any:
    group, cpu_group = resolve_groups(group, cpu_group)
    if dist.get_world_size(group) == 1:
        return tensor_dict if blocking else []
    dst = _peer(group, dst, 1, "dst")
    link = get_link(group, cpu_group, dst)
    enc = codec.encode(
        tensor_dict,
        allow_pickle=allow_pickle,
        limits=DEFAULT_LIMITS,
        tp=tp_of(all_gather_group),
        all_gather_tensors=all_gather_tensors,
    )
    if blocking:
        link.send_blocking(enc, chunk_bytes=DEFAULT_CHUNK_BYTES)
        return None
    return [link.send(enc, chunk_bytes=DEFAULT_CHUNK_BYTES)]


def irecv_tensor_dict(
    src: int | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    cpu_group: dist.ProcessGroup | None = None,
    all_gather_group: dist.ProcessGroup | None = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any] | None, list[Handle], list[Callable[[], None]]]:
    """Receives the next hop's head from ``src`` and posts its payload receives.

    Returns ``(dict, handles, postprocess)``: the dict's tensors are views of one buffer per
    device type and hold valid data once every handle's ``wait()`` and then every postprocess
    call (the TP all-gather and reassembly, which replace the sliced keys' values) have run.
    The slicing decisions come from the sender's hop; ``all_gather_tensors`` is accepted for
    call compatibility and not needed here.
    """
    del all_gather_tensors  # the per-key decision travels in the hop
    group, cpu_group = resolve_groups(group, cpu_group)
    if dist.get_world_size(group) == 1:
        return None, [], []
    src = _peer(group, src, -1, "src")
    link = get_link(group, cpu_group, src)
    opts = RecvOptions(
        allow_pickle=allow_pickle,
        limits=DEFAULT_LIMITS,
        tp=tp_of(all_gather_group),
        check=None,
        timeout=None,
    )
    return link.advance(link.post(opts))


def send_tensor_dict(
    tensor_dict: Mapping[str, Any], dst: int | None = None, **kwargs: Any
) -> Mapping[str, Any] | None:
    """Blocking send: returns once the transport has taken the bytes, raises if that failed.

    With a group of one rank it returns ``tensor_dict`` unchanged, as vLLM does.
    """
    return _send(tensor_dict, dst, blocking=True, **kwargs)


def recv_tensor_dict(src: int | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """Receives one hop and returns the dict, ready to use (``None`` with a group of one)."""
    d, handles, post = irecv_tensor_dict(src, **kwargs)
    for h in handles:
        h.wait()
    for fn in post:
        fn()
    return d
