"""Routes one vLLM ``GroupCoordinator``'s PP hops through pipepack.

    from pipepack.integrations import vllm as pipepack_vllm
    pipepack_vllm.install(get_pp_group())

After that vLLM's own calls, unchanged, go through pipepack, with vLLM's call shapes and return
values:

- ``send_tensor_dict(tensor_dict, dst=None, all_gather_group=None, all_gather_tensors=None)``
  returns ``None`` once the transport has taken the bytes (the dict itself when
  ``world_size == 1``);
- ``recv_tensor_dict(src=None, all_gather_group=None, all_gather_tensors=None)`` returns the
  dict (``None`` when ``world_size == 1``);
- ``isend_tensor_dict(...)`` returns a list of handles (``wait()``); ``irecv_tensor_dict(...)``
  returns ``(dict, handles, postprocess)``: the dict is ready after every handle's ``wait()``
  and then every postprocess call;
- ``dst``/``src`` are ranks within the group (defaults next / previous); ``all_gather_group`` is
  a GroupCoordinator (the TP group): a key whose numel divides by its world size travels as
  ``t.reshape(W, -1)[rank_in_group]`` unless ``all_gather_tensors`` maps it to False, and is
  rebuilt after one all-gather for all keys. The sender's decision travels with the hop, so the
  receiver's ``all_gather_tensors`` is accepted and not needed.

What differs from vLLM's own transport: nothing is pickled unless ``allow_pickle=True``, the
sources may be overwritten as soon as a send returns, and a failed hop raises naming the peer and
the step. Only this instance is patched; :func:`uninstall` restores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from pipepack import pp

from . import _common

__all__ = ["install", "uninstall"]

_ENGINE = "vllm"


def _kwargs(self: Any, all_gather_group: Any, method: str) -> dict[str, Any]:
    return dict(
        group=self.device_group,
        cpu_group=self.cpu_group,
        all_gather_group=_common.gather_group(all_gather_group, method),
        allow_pickle=_common.record(self).options[0],
    )


def _isend_tensor_dict(
    self: Any,
    tensor_dict: Mapping[str, Any],
    dst: int | None = None,
    all_gather_group: Any = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> list[pp.Handle]:
    if _common.alone(self):
        return []
    method = "isend_tensor_dict"
    _common.check_all_gather_tensors(all_gather_tensors, method)
    peer = _common.peer(self, dst, 1, "dst", method)
    return pp.isend_tensor_dict(
        tensor_dict,
        peer,
        all_gather_tensors=all_gather_tensors,
        **_kwargs(self, all_gather_group, method),
    )


def _send_tensor_dict(
    self: Any,
    tensor_dict: Mapping[str, Any],
    dst: int | None = None,
    all_gather_group: Any = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> Mapping[str, Any] | None:
    if not dist.is_initialized() or _common.alone(self):
        return tensor_dict
    method = "send_tensor_dict"
    _common.check_all_gather_tensors(all_gather_tensors, method)
    peer = _common.peer(self, dst, 1, "dst", method)
    pp.send_tensor_dict(
        tensor_dict,
        peer,
        all_gather_tensors=all_gather_tensors,
        **_kwargs(self, all_gather_group, method),
    )
    return None


def _irecv_tensor_dict(
    self: Any,
    src: int | None = None,
    all_gather_group: Any = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> tuple[dict[str, Any] | None, list[pp.Handle], list[Callable[[], None]]]:
    if not dist.is_initialized() or _common.alone(self):
        return None, [], []
    method = "irecv_tensor_dict"
    _common.check_all_gather_tensors(all_gather_tensors, method)
    peer = _common.peer(self, src, -1, "src", method)
    return pp.irecv_tensor_dict(peer, **_kwargs(self, all_gather_group, method))


def _recv_tensor_dict(
    self: Any,
    src: int | None = None,
    all_gather_group: Any = None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> dict[str, Any] | None:
    if not dist.is_initialized() or _common.alone(self):
        return None
    method = "recv_tensor_dict"
    _common.check_all_gather_tensors(all_gather_tensors, method)
    peer = _common.peer(self, src, -1, "src", method)
    return pp.recv_tensor_dict(peer, **_kwargs(self, all_gather_group, method))


def install(pp_group: Any, *, allow_pickle: bool = False) -> Any:
    """Patches ``pp_group`` (this instance only) to send and receive through pipepack.

    Both ends of a hop must be installed, with the same ``allow_pickle``. Installing again with
    the same options does nothing; with other options, or on a group that has pipepack's sglang
    adapter, it raises. Returns ``pp_group``.
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
            "isend_tensor_dict": _isend_tensor_dict,
            "irecv_tensor_dict": _irecv_tensor_dict,
        },
    )
    return pp_group


def uninstall(pp_group: Any) -> Any:
    """Restores exactly the methods :func:`install` replaced. Returns ``pp_group``."""
    _common.unpatch(pp_group, _ENGINE)
    return pp_group
