"""The engines' own per-tensor PP transport, as a baseline for the adapters' per-hop speedup.

Written from how sglang's and vLLM's ``GroupCoordinator`` move a tensor dict: the dict is split
into a metadata list (``(key, TensorMeta | value)`` in key order) and its tensors; the metadata
is pickled and sent over the CPU (gloo) group as two messages, its size (one int64) and its
bytes; then every non-empty tensor is sent as its own message, over the CPU group when it is a
CPU tensor and over the device group otherwise. With a TP ``all_gather_group`` of W ranks a
tensor whose numel divides by W (and that ``all_gather_tensors`` does not map to False) is sent
as ``t.reshape(W, -1)[rank]`` and the receiver rebuilds it with one all-gather per tensor.
Plain values, including lists of tensors, travel inside the pickled metadata.

- sglang style (:func:`send` / :func:`recv`): the send posts each message blocking, or with
  ``async_send`` non-blocking, returning the works (``.work``, ``.payload``); the receive waits
  on each tensor (and its all-gather) before posting the next.
- vLLM style (:func:`vllm_isend` / :func:`vllm_irecv`, blocking :func:`vllm_send` /
  :func:`vllm_recv`): the tensors are posted at once; the receive posts every tensor's receive,
  and the all-gathers run as postprocess calls after the waits.

``dst``/``src`` are ranks within ``group``; ``all_gather_group`` is a ProcessGroup here. The
benchmark hook is :func:`pair` (modes :data:`MODES`): the same call sequence through a
GroupCoordinator-shaped object, with and without pipepack's adapter installed on it.
"""

from __future__ import annotations

import pickle
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TensorMeta",
    "P2PWork",
    "send",
    "recv",
    "vllm_isend",
    "vllm_irecv",
    "vllm_send",
    "vllm_recv",
    "SglangCoordinator",
    "VllmCoordinator",
    "MODES",
    "pair",
]

TensorMeta = namedtuple("TensorMeta", ["device", "dtype", "size"])
# torch >= 2.12 renames all_gather_into_tensor; both exist in between
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class P2PWork:
    work: Any
    payload: torch.Tensor


def _split(d: Mapping[str, Any]) -> tuple[list, list[tuple[str, torch.Tensor]]]:
    meta, tensors = [], []
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            meta.append((k, TensorMeta(v.device.type, v.dtype, v.size())))
            tensors.append((k, v))
        else:
            meta.append((k, v))
    return meta, tensors


def _tp(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _sliced(key: str, numel: int, world: int, agt: Mapping[str, bool] | None) -> bool:
    return world > 1 and numel % world == 0 and (agt is None or agt.get(key, True))


def _peer(group: dist.ProcessGroup, rank: int) -> int:
    return dist.get_global_rank(group, rank)


def _send_object(obj: Any, dst: int, cpu_group, async_send: bool) -> list[P2PWork]:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    if not async_send:
        dist.send(size, dst, group=cpu_group)
        dist.send(data, dst, group=cpu_group)
        return []
    return [P2PWork(dist.isend(t, dst, group=cpu_group), t) for t in (size, data)]


def _recv_object(src: int, cpu_group) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=cpu_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, group=cpu_group)
    return pickle.loads(data.numpy().tobytes())


def _empty(m: TensorMeta) -> torch.Tensor:
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if m.device == "cuda"
        else torch.device(m.device)
    )
    return torch.empty(m.size, dtype=m.dtype, device=dev)


def _gather(part: torch.Tensor, world: int, group) -> torch.Tensor:
    full = torch.empty((world, part.numel()), dtype=part.dtype, device=part.device)
    _all_gather(full.view(-1), part, group=group)
    return full


def _post_sends(d, dst, group, cpu_group, all_gather_group, agt, async_send):
    """The engines' send: metadata (2 messages), then one message per non-empty tensor."""
    world, rank = _tp(all_gather_group)
    peer = _peer(group, dst)
    meta, tensors = _split(d)
    works = _send_object(meta, peer, cpu_group, async_send)
    for k, t in tensors:
        if t.numel() == 0:
            continue
        if _sliced(k, t.numel(), world, agt):
            t = t.reshape(world, -1)[rank]
        grp = cpu_group if t.is_cpu else group
        if async_send:
            works.append(P2PWork(dist.isend(t, peer, group=grp), t))
        else:
            dist.send(t, peer, group=grp)
    return works


# ----------------------------------------------------------------------------- sglang style


def send(
    d: Mapping[str, Any],
    dst: int,
    group,
    cpu_group,
    *,
    all_gather_group=None,
    async_send: bool = False,
) -> list[P2PWork]:
    """sglang's send: blocking per message, or non-blocking returning the works."""
    return _post_sends(d, dst, group, cpu_group, all_gather_group, None, async_send)


def recv(src: int, group, cpu_group, *, all_gather_group=None) -> dict[str, Any]:
    """sglang's receive: each tensor received (and all-gathered) before the next is posted."""
    world, rank = _tp(all_gather_group)
    peer = _peer(group, src)
    out: dict[str, Any] = {}
    for k, m in _recv_object(peer, cpu_group):
        if not isinstance(m, TensorMeta):
            out[k] = m
            continue
        t = _empty(m)
        if t.numel() == 0:
            out[k] = t
            continue
        sliced = _sliced(k, t.numel(), world, None)
        part = t.reshape(world, -1)[rank] if sliced else t
        dist.irecv(part, peer, group=cpu_group if part.is_cpu else group).wait()
        out[k] = _gather(part, world, all_gather_group).view(m.size) if sliced else t
    return out


# ----------------------------------------------------------------------------- vLLM style


def vllm_isend(
    d: Mapping[str, Any],
    dst: int,
    group,
    cpu_group,
    *,
    all_gather_group=None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> list:
    """vLLM's isend_tensor_dict: metadata blocking, then every tensor posted; the handles."""
    meta_and_tensors = _split(d)
    world, rank = _tp(all_gather_group)
    peer = _peer(group, dst)
    _send_object(meta_and_tensors[0], peer, cpu_group, False)
    handles = []
    for k, t in meta_and_tensors[1]:
        if t.numel() == 0:
            continue
        if _sliced(k, t.numel(), world, all_gather_tensors):
            t = t.reshape(world, -1)[rank]
        handles.append(dist.isend(t, peer, group=cpu_group if t.is_cpu else group))
    return handles


def vllm_send(
    d: Mapping[str, Any],
    dst: int,
    group,
    cpu_group,
    *,
    all_gather_group=None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> None:
    for h in vllm_isend(
        d,
        dst,
        group,
        cpu_group,
        all_gather_group=all_gather_group,
        all_gather_tensors=all_gather_tensors,
    ):
        h.wait()


def vllm_irecv(
    src: int,
    group,
    cpu_group,
    *,
    all_gather_group=None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> tuple[dict[str, Any], list, list[Callable[[], None]]]:
    """vLLM's irecv_tensor_dict: every receive posted; all-gathers as postprocess calls."""
    world, rank = _tp(all_gather_group)
    peer = _peer(group, src)
    out: dict[str, Any] = {}
    handles: list = []
    post: list[Callable[[], None]] = []
    for k, m in _recv_object(peer, cpu_group):
        if not isinstance(m, TensorMeta):
            out[k] = m
            continue
        t = _empty(m)
        out[k] = t
        if t.numel() == 0:
            continue
        if _sliced(k, t.numel(), world, all_gather_tensors):
            part = t.reshape(world, -1)[rank]

            def gather(k=k, part=part, size=m.size) -> None:
                out[k] = _gather(part, world, all_gather_group).view(size)

            post.append(gather)
        else:
            part = t
        handles.append(dist.irecv(part, peer, group=cpu_group if part.is_cpu else group))
    return out, handles, post


def vllm_recv(
    src: int,
    group,
    cpu_group,
    *,
    all_gather_group=None,
    all_gather_tensors: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    out, handles, post = vllm_irecv(
        src,
        group,
        cpu_group,
        all_gather_group=all_gather_group,
        all_gather_tensors=all_gather_tensors,
    )
    for h in handles:
        h.wait()
    for fn in post:
        fn()
    return out


# ----------------------------------------------------------------------------- coordinators


class Coordinator:
    """GroupCoordinator-shaped: ``ranks``, ``world_size``, ``rank_in_group`` and the groups.

    ``ranks`` (global ranks, in the group's order) default to the device group's; with
    ``ranks`` given, the groups may be None (a group of one rank with no process group).
    ``dst``/``src`` are indexes into ``ranks``, mapped to ranks of the device group.
    """

    def __init__(self, device_group, cpu_group=None, *, ranks=None, rank=None) -> None:
        self.device_group = device_group
        self.cpu_group = device_group if cpu_group is None else cpu_group
        if ranks is None:
            ranks = [
                dist.get_global_rank(device_group, i)
                for i in range(dist.get_world_size(device_group))
            ]
        self.ranks = list(ranks)
        self.world_size = len(self.ranks)
        self.rank_in_group = self.ranks.index(dist.get_rank() if rank is None else rank)

    def _peer(self, index: int | None, step: int) -> int:
        if index is None:
            index = (self.rank_in_group + step) % self.world_size
        return dist.get_group_rank(self.device_group, self.ranks[index])

    def _dst(self, dst: int | None) -> int:
        return self._peer(dst, 1)

    def _src(self, src: int | None) -> int:
        return self._peer(src, -1)


def _pg(ag: Any):
    return None if ag is None or ag.world_size == 1 else ag.device_group


class SglangCoordinator(Coordinator):
    def send_tensor_dict(self, tensor_dict, dst=None, all_gather_group=None, async_send=False):
        if self.world_size == 1:
            return tensor_dict
        return send(
            tensor_dict,
            self._dst(dst),
            self.device_group,
            self.cpu_group,
            all_gather_group=_pg(all_gather_group),
            async_send=async_send,
        )

    def recv_tensor_dict(self, src=None, all_gather_group=None):
        if self.world_size == 1:
            return None
        return recv(
            self._src(src),
            self.device_group,
            self.cpu_group,
            all_gather_group=_pg(all_gather_group),
        )


class VllmCoordinator(Coordinator):
    def isend_tensor_dict(
        self, tensor_dict, dst=None, all_gather_group=None, all_gather_tensors=None
    ):
        if self.world_size == 1:
            return []
        return vllm_isend(
            tensor_dict,
            self._dst(dst),
            self.device_group,
            self.cpu_group,
            all_gather_group=_pg(all_gather_group),
            all_gather_tensors=all_gather_tensors,
        )

    def send_tensor_dict(
        self, tensor_dict, dst=None, all_gather_group=None, all_gather_tensors=None
    ):
        if self.world_size == 1:
            return tensor_dict
        for h in self.isend_tensor_dict(tensor_dict, dst, all_gather_group, all_gather_tensors):
            h.wait()
        return None

    def irecv_tensor_dict(self, src=None, all_gather_group=None, all_gather_tensors=None):
        if self.world_size == 1:
            return None, [], []
        return vllm_irecv(
            self._src(src),
            self.device_group,
            self.cpu_group,
            all_gather_group=_pg(all_gather_group),
            all_gather_tensors=all_gather_tensors,
        )

    def recv_tensor_dict(self, src=None, all_gather_group=None, all_gather_tensors=None):
        if self.world_size == 1:
            return None
        out, handles, post = self.irecv_tensor_dict(src, all_gather_group, all_gather_tensors)
        for h in handles:
            h.wait()
        for fn in post:
            fn()
        return out


# ----------------------------------------------------------------------------- benchmark hook

MODES = ("sglang", "sglang_pipepack", "vllm", "vllm_pipepack")


def pair(mode: str, *, group, cpu_group=None, tp_group=None):
    """``(send(d, dst), recv(src) -> dict, close())`` for one benchmark mode.

    ``sglang``: the scheduler's calls on the engine-shaped transport: ``send_tensor_dict(d, dst,
    all_gather_group=tp, async_send=True)``, the previous send's works waited before the next
    send (one in flight), and the blocking ``recv_tensor_dict``. ``vllm``: the blocking
    ``send_tensor_dict`` / ``recv_tensor_dict``. ``*_pipepack``: the same calls on the same
    coordinator after ``pipepack.integrations.<engine>.install``. ``dst``/``src`` are ranks within
    ``group``; ``tp_group`` (a ProcessGroup, every rank builds it) is the all-gather group.
    ``close()`` waits for what is still in flight and uninstalls the adapter.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    engine, _, via = mode.partition("_")
    cls = SglangCoordinator if engine == "sglang" else VllmCoordinator
    coord = cls(group, cpu_group)
    tp = None if tp_group is None else Coordinator(tp_group)
    adapter = None
    if via == "pipepack":
        if engine == "sglang":
            from pipepack.integrations import sglang as adapter
        else:
            from pipepack.integrations import vllm as adapter
        adapter.install(coord)
    pending: list = []

    if engine == "sglang":

        def send_(d, dst):
            for w in pending:
                w.work.wait()
            pending[:] = coord.send_tensor_dict(d, dst, all_gather_group=tp, async_send=True)
    else:

        def send_(d, dst):
            coord.send_tensor_dict(d, dst, all_gather_group=tp)

    def recv_(src):
        return coord.recv_tensor_dict(src, all_gather_group=tp)

    def close():
        for w in pending:
            w.work.wait()
        pending.clear()
        if adapter is not None:
            adapter.uninstall(coord)

    return send_, recv_, close
