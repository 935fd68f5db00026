"""Routes one sglang ``GroupCoordinator``'s PP hops through pipepack.

    from pipepack.integrations import sglang as pipepack_sglang
    pipepack_sglang.install(get_pp_group())

After that the scheduler's own calls, unchanged, go through pipepack:
``send_tensor_dict(tensor_dict, dst=None, all_gather_group=None, async_send=False)`` and
``recv_tensor_dict(src=None, all_gather_group=None)``, with sglang's semantics:

- ``dst``/``src`` are ranks within the group (defaults: next / previous in the ring);
- ``all_gather_group`` is a GroupCoordinator (the attention-TP group): every key whose numel
  divides by its world size travels as ``t.reshape(W, -1)[rank_in_group]`` and the receiver
  rebuilds it with one all-gather (pipepack gathers once for all keys, over its device group);
- ``async_send=True`` returns a list of works (``.work.wait()``, ``.payload``); otherwise the
  call returns ``[]`` once the transport has taken the bytes, and raises if that failed;
- with ``world_size == 1`` the send returns the dict and the receive ``None``.

What differs from sglang's own transport: nothing is pickled unless ``allow_pickle=True`` (a
value that would need it raises on the sender, naming its key), lists of per-request tensors
travel in the payload, the sources may be overwritten as soon as the send returns (``payload`` is
``None``: there is nothing of the caller's to keep alive), and a failed hop raises naming the
peer and the step. Only this instance is patched; :func:`uninstall` restores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pipepack import pp

from . import _common

__all__ = ["install", "uninstall", "P2PWork"]

_ENGINE = "sglang"


@dataclass
class P2PWork:
    """sglang's send work: ``work.wait()`` finishes the send. ``payload`` is always ``None``."""

    work: _common.Work
    payload: Any = None


def _send_tensor_dict(
    self: Any,
    tensor_dict: Mapping[str, Any],
    dst: int | None = None,
    all_gather_group: Any = None,
    async_send: bool = False,
) -> Any:
    if _common.alone(self):
        return tensor_dict
    method = "send_tensor_dict"
    peer = _common.peer(self, dst, 1, "dst", method)
    kw = dict(
        group=self.device_group,
        cpu_group=self.cpu_group,
        all_gather_group=_common.gather_group(all_gather_group, method),
        allow_pickle=_common.record(self).options[0],
    )
    if not async_send:
        pp.send_tensor_dict(tensor_dict, peer, **kw)
        return []
    return [P2PWork(_common.Work(h)) for h in pp.isend_tensor_dict(tensor_dict, peer, **kw)]


def _recv_tensor_dict(
    self: Any,
    src: int | None = None,
    all_gather_group: Any = None,
) -> dict[str, Any] | None:
    if not dist.is_initialized() or _common.alone(self):
        return None
    method = "recv_tensor_dict"
    peer = _common.peer(self, src, -1, "src", method)
    return pp.recv_tensor_dict(
        peer,
        group=self.device_group,
        cpu_group=self.cpu_group,
        all_gather_group=_common.gather_group(all_gather_group, method),
        allow_pickle=_common.record(self).options[0],
    )


def install(pp_group: Any, *, allow_pickle: bool = False) -> Any:
    """Patches ``pp_group`` (this instance only) to send and receive through pipepack.

    Both ends of a hop must be installed (pipepack's wire is not sglang's) with the same
    ``allow_pickle``. Installing again with the same options does nothing; with other options,
    or on a group that has pipepack's vLLM adapter, it raises. Returns ``pp_group``.
    """
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be a bool, got {allow_pickle!r}")
    _common.patch(
        pp_group,
        _ENGINE,
        (allow_pickle,),
        {
            "send_tensor_dict": _send_tensor_dict,
            "recv_tensor_dict": _recv_tensor_dict,
        },
    )
    return pp_group


def uninstall(pp_group: Any) -> Any:
    """Restores exactly the methods :func:`install` replaced. Returns ``pp_group``."""
    _common.unpatch(pp_group, _ENGINE)
    return pp_group
