"""What the sglang and vLLM adapters share: patching one coordinator instance, rank mapping.

An engine's ``GroupCoordinator`` is duck-typed here: ``ranks`` (global ranks, in group order),
``world_size``, ``rank_in_group``, ``device_group`` and ``cpu_group`` (torch ProcessGroups).
Nothing is imported from either engine.
"""

from __future__ import annotations

import datetime
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from pipepack.pp import Handle

COORDINATOR_ATTRS = ("ranks", "world_size", "rank_in_group", "device_group", "cpu_group")
_RECORD = "_pipepack_integration"  # instance attribute holding what install() replaced
_ABSENT = object()


class _Installed:
    """What one install() did to one coordinator instance."""

    def __init__(
        self, engine: str, options: tuple, saved: dict[str, Any], patched: dict[str, Any]
    ) -> None:
        self.engine = engine
        self.options = options
        self.saved = saved  # name -> the instance attribute before install, or _ABSENT
        self.patched = patched  # name -> the bound method install() put there
        self.peer_ranks: list[int] | None = None  # device_group rank of each coordinator index


def check_coordinator(obj: Any, what: str) -> None:
    missing = [a for a in COORDINATOR_ATTRS if not hasattr(obj, a)]
    if missing:
        raise TypeError(
            f"{what} must be a GroupCoordinator (attributes "
            f"{', '.join(COORDINATOR_ATTRS)}); {type(obj).__name__} has no "
            f"{', '.join(missing)}"
        )
    if len(obj.ranks) != obj.world_size:
        raise ValueError(f"{what}: world_size={obj.world_size} but ranks={list(obj.ranks)}")


def patch(
    coord: Any, engine: str, options: tuple, methods: Mapping[str, Callable[..., Any]]
) -> None:
    """Binds ``methods`` on the instance ``coord``, remembering what was there before.

    Installing the same engine with the same options again does nothing; anything else
    already installed raises.
    """
    check_coordinator(coord, "pp_group")
    rec = coord.__dict__.get(_RECORD)
    if rec is not None:
        if rec.engine == engine and rec.options == options:
            return
        raise RuntimeError(
            f"pipepack's {rec.engine} adapter is already installed on this "
            f"group with options {rec.options}; call "
            f"pipepack.integrations.{rec.engine}.uninstall(pp_group) first"
        )
    saved = {name: coord.__dict__.get(name, _ABSENT) for name in methods}
    patched = {name: types.MethodType(fn, coord) for name, fn in methods.items()}
    coord.__dict__[_RECORD] = _Installed(engine, options, saved, patched)
    for name, bound in patched.items():
        setattr(coord, name, bound)


def unpatch(coord: Any, engine: str) -> None:
    """Puts back exactly what :func:`patch` replaced (class methods show through again)."""
    rec = coord.__dict__.get(_RECORD)
    if rec is None or rec.engine != engine:
        raise ValueError(f"pipepack's {engine} adapter is not installed on this group")
    for name, bound in rec.patched.items():
        if coord.__dict__.get(name) is not bound:
            raise RuntimeError(
                f"{name} of this group was replaced after pipepack's {engine} "
                "adapter was installed; not restoring over it"
            )
    for name, orig in rec.saved.items():
        if orig is _ABSENT:
            del coord.__dict__[name]
        else:
            setattr(coord, name, orig)
    del coord.__dict__[_RECORD]


def record(coord: Any) -> _Installed:
    rec = coord.__dict__.get(_RECORD)
    if rec is None:  # a bound method kept from before uninstall()
        raise RuntimeError("pipepack's adapter is no longer installed on this group")
    return rec


def alone(coord: Any) -> bool:
    return coord.world_size == 1


def peer(coord: Any, index: Any, default_step: int, name: str, method: str) -> int:
    """``dst``/``src`` (an index into ``coord.ranks``) as a rank of ``coord.device_group``."""
    me, world = coord.rank_in_group, coord.world_size
    if index is None:
        index = (me + default_step) % world
    elif (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < world
        or index == me
    ):
        raise ValueError(
            f"{method}: {name}={index!r} is not another rank of this group "
            f"(ranks {list(coord.ranks)}, this is rank_in_group {me}); {name} "
            "is a rank within the group, not a global rank"
        )
    rec = record(coord)
    if rec.peer_ranks is None:
        g = coord.device_group
        rec.peer_ranks = [dist.get_group_rank(g, r) for r in coord.ranks]
    return rec.peer_ranks[index]


_GATHER_CHECKED: dict[int, tuple[Any, Any]] = {}


def gather_group(ag: Any, method: str) -> dist.ProcessGroup | None:
    """The ProcessGroup pipepack all-gathers over for an engine's ``all_gather_group``.

    ``None`` and a coordinator of one rank mean no slicing. The device group is used: the keys
    it can carry (device tensors on NCCL, every tensor on gloo) travel sliced, the others whole;
    the receiver gets the same full tensors either way.
    """
    if ag is None:
        return None
    hit = _GATHER_CHECKED.get(id(ag))
    if hit is not None and hit[0] is ag:
        return hit[1]
    if isinstance(ag, dist.ProcessGroup) or not all(
        hasattr(ag, a) for a in ("world_size", "rank_in_group", "device_group")
    ):
        raise TypeError(
            f"{method}: all_gather_group must be a GroupCoordinator (world_size, "
            f"rank_in_group, device_group), got {type(ag).__name__}"
        )
    if ag.world_size == 1:
        pg = None
    else:
        pg = ag.device_group
        n, r = dist.get_world_size(pg), dist.get_rank(pg)
        if (n, r) != (ag.world_size, ag.rank_in_group):
            raise ValueError(
                f"{method}: all_gather_group says world_size={ag.world_size}, "
                f"rank_in_group={ag.rank_in_group}, but its device_group has "
                f"{n} ranks and this is rank {r}"
            )
    _GATHER_CHECKED[id(ag)] = (ag, pg)
    return pg


def check_all_gather_tensors(agt: Any, method: str) -> None:
    if agt is None:
        return
    if not isinstance(agt, Mapping) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in agt.items()
    ):
        raise TypeError(f"{method}: all_gather_tensors must map keys (str) to bool, got {agt!r}")


class Work:
    """A send's completion, with the call shape of ``torch.distributed.Work``."""

    __slots__ = ("_handle",)

    def __init__(self, handle: Handle) -> None:
        self._handle = handle

    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        self._handle.wait(timeout)
        return True

    def is_completed(self) -> bool:
        return self._handle.is_completed()
