"""vLLM / sglang ``GroupCoordinator``-shaped functions over the process's links.

Every call names its peer within ``group``; all calls to one (group, peer) share one link
whatever their per-call options, which travel in the hop itself. With no process group
initialised these raise (a silently dropped hop is data loss); with a group of one rank they
short-circuit as the engines do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from . import codec, wirepack
from .channel import Wire, resolve_groups, tp_of
from .link import DEFAULT_CHUNK_BYTES, Link, RecvOptions, get_link, reset_links
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


_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _link_for(
    group: dist.ProcessGroup | None,
    cpu_group: dist.ProcessGroup | None,
    rank: int | None,
    step: int,
    what: str,
) -> Link | None:
    """The link a call talks on (None in a group of one rank), kept per (group, cpu group,
    rank): torch's group lookups cost a few µs each, and every hop asks."""
    g = dist.group.WORLD if group is None and dist.is_initialized() else group
    per = _FAST.get(g) if g is not None else None
    key = (cpu_group, rank, step)
    if per is not None:
        hit = per.get(key)
        if hit is not None:
            return hit[0]
    g, cg = resolve_groups(g, cpu_group)
    link = None
    if dist.get_world_size(g) > 1:
        link = get_link(g, cg, _peer(g, rank, step, what))
    _FAST.setdefault(g, {})[key] = (link,)
    return link


def reset_channels() -> None:
    """Forgets every link (call after re-creating process groups)."""
    _FAST.clear()
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
    link = _link_for(group, cpu_group, dst, 1, "dst")
    if link is None:
        return tensor_dict if blocking else []
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
    accept_wire: Wire | None = None,
) -> tuple[dict[str, Any] | None, list[Handle], list[Callable[[], None]]]:
    """Receives the next hop's head from ``src`` and posts its payload receives.

    Returns ``(dict, handles, postprocess)``: the dict's tensors are views of one buffer per
    device type and hold valid data once every handle's ``wait()`` and then every postprocess
    call (the TP all-gather and reassembly, which replace the sliced keys' values) have run.
    The slicing decisions come from the sender's hop; ``all_gather_tensors`` is accepted for
    call compatibility and not needed here.

    These functions never send keys folded or as fp8, and refuse a hop that has them (a
    ``TensorDictChannel`` with ``wire=`` sends those) unless ``accept_wire`` (a
    :class:`~pipepack.pp.Wire`) takes them; the last postprocess call then restores those keys
    as ``PendingRecv.wait`` does.
    """
    del all_gather_tensors  # the per-key decision travels in the hop
    link = _link_for(group, cpu_group, src, -1, "src")
    if link is None:
        return None, [], []
    if accept_wire is not None and not isinstance(accept_wire, Wire):
        raise TypeError(f"accept_wire must be a pipepack.pp.Wire, got {type(accept_wire).__name__}")
    wire = wirepack.WireRecv(accept_wire) if accept_wire else None
    opts = RecvOptions(
        allow_pickle=allow_pickle,
        limits=DEFAULT_LIMITS,
        tp=tp_of(all_gather_group),
        check=None,
        timeout=None,
        accept_wire=wire,
    )
    d, handles, post = link.advance(link.post(opts))
    if wire is not None and wire.wired:
        post = [*post, lambda d=d, wired=wire.wired: wirepack.restore(d, wired)]
    return d, handles, post


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
