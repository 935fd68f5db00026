"""A forward-only pipeline stage: micro-batches in, micro-batches out, transfer under compute.

The driver is the loop a serving engine's PP worker runs, reduced to what the transport needs to
be used well: receives are posted *before* the stage computes, so the payload of micro-batch
``k + 1`` (and up to ``depth`` more) moves while micro-batch ``k`` is computed; each output is
sent as soon as it exists, and the send returns at once (the channel copies it and a background
reaper completes it). It knows nothing of the model: any ``nn.Module`` (or callable) that maps a
tensor dict to a tensor dict is a stage.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .channel import PendingRecv, TensorDictChannel
from .transport import Handle

__all__ = ["StageDriver", "StageTimes"]


@dataclass(frozen=True)
class StageTimes:
    """Where one :meth:`StageDriver.run` spent its time (seconds, host clock).

    ``recv_wait`` is the time blocked on receives: near zero when transfer overlaps compute.
    ``send_wait`` is the time blocked on the send window (back-pressure from the next stage).
    """

    microbatches: int
    total: float
    compute: float
    recv_wait: float
    send_wait: float


class StageDriver:
    """Runs one pipeline stage over a sequence of micro-batches, in order.

    ``recv_channel`` is ``None`` on the first stage (it reads its inputs from :meth:`run`'s
    argument) and ``send_channel`` is ``None`` on the last (it returns its outputs).

    ``depth`` (>= 1) is how many micro-batches may be in flight ahead of the one being computed,
    in both directions: before the stage computes micro-batch ``k`` the receives of ``k + 1 ..
    k + depth`` are posted, and before it sends ``k`` at most ``depth`` earlier sends may still be
    incomplete; a send beyond that waits for the oldest. The window bounds the memory a fast
    stage can pile up in front of a slow one and keeps every receive buffer's size known in
    advance, while depth 1 already hides one transfer behind one compute.

    ``num_tokens`` gives the leading size of micro-batch ``k``'s payload (the serving case: the
    scheduler already told every PP rank the batch); a :class:`~pipepack.pp.declared.Declared`
    channel checks each hop against it. A sequence or ``k -> int``.

    ``receive`` (optional) turns a posted receive into the stage's input, e.g.
    ``lambda p: {**p.wait_add_rmsnorm(w, eps), "__normed__": True}`` to run the first layer's
    fused add + norm on the hop's bytes.

    ``static_inputs`` (optional) are caller-owned buffers, e.g. a CUDA graph's static inputs:
    each received micro-batch is copied into them (``PendingRecv.wait_into``, one launch per
    device type) and the module sees ``buf[:T]`` views of them. Their dim 0 must hold the
    largest micro-batch. They are overwritten by the next micro-batch only after the module
    returned, since the copy happens when the driver waits, not when the bytes arrive (a last
    stage whose outputs are views of its inputs must copy them).

    Messages on a channel arrive in the order sent (FIFO), and the driver posts and waits in
    micro-batch order, so output ``k`` of the last stage is micro-batch ``k``'s. Every stage
    must be given the same number of micro-batches: the count is not on the wire. An exception
    from the module leaves the receives already posted on the wire: the channels are then out
    of step with their peers and must be recreated.
    """

    def __init__(
        self,
        module: Callable[[dict[str, Any]], Mapping[str, Any]],
        *,
        recv_channel: TensorDictChannel | None = None,
        send_channel: TensorDictChannel | None = None,
        depth: int = 1,
        num_tokens: Sequence[int] | Callable[[int], int] | None = None,
        static_inputs: Mapping[str, torch.Tensor] | None = None,
        receive: Callable[[PendingRecv], dict[str, Any]] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (micro-batches in flight), got {depth}")
        if static_inputs is not None and receive is not None:
            raise ValueError("pass static_inputs or receive, not both")
        if static_inputs is not None and recv_channel is None:
            raise ValueError(
                "static_inputs are filled from received payloads; the first stage "
                "(no recv_channel) has none"
            )
        self.module = module
        self.recv_channel = recv_channel
        self.send_channel = send_channel
        self.depth = depth
        self.num_tokens = num_tokens
        self.static_inputs = static_inputs
        self.receive = receive
        self.last_times: StageTimes | None = None

    def _tokens(self, k: int) -> int | None:
        if self.num_tokens is None:
            return None
        if callable(self.num_tokens):
            return int(self.num_tokens(k))
        return int(self.num_tokens[k])

    def _post(self, k: int) -> PendingRecv:
        return self.recv_channel.irecv(self._tokens(k))

    def run(
        self,
        inputs: Sequence[Mapping[str, Any]] | None = None,
        *,
        num_microbatches: int | None = None,
    ) -> list[Mapping[str, Any]]:
        """Runs every micro-batch through the stage; returns the outputs on the last stage.

        The first stage passes ``inputs`` (one dict per micro-batch); the others pass
        ``num_microbatches``, the same count. Stages other than the last return ``[]``, after
        posting every send (a background reaper completes them; ``REAPER.drain()`` waits).
        """
        if self.recv_channel is None:
            if inputs is None:
                raise ValueError(
                    "the first stage (no recv_channel) takes its micro-batches as inputs"
                )
            if num_microbatches is not None and num_microbatches != len(inputs):
                raise ValueError(f"num_microbatches={num_microbatches} but {len(inputs)} inputs")
            n = len(inputs)
        else:
            if inputs is not None:
                raise ValueError(
                    "a stage with a recv_channel receives its micro-batches; pass "
                    "num_microbatches instead of inputs"
                )
            if num_microbatches is None or num_microbatches < 0:
                raise ValueError(
                    "num_microbatches (>= 0) is required: every stage must run the "
                    "same count, it is not on the wire"
                )
            n = num_microbatches

        outputs: list[Mapping[str, Any]] = []
        posted: collections.deque[PendingRecv] = collections.deque()
        sends: collections.deque[list[Handle]] = collections.deque()
        compute = recv_wait = send_wait = 0.0
        t_start = time.perf_counter()
        if self.recv_channel is not None:
            for k in range(min(self.depth, n)):  # micro-batches 0 .. depth-1 before any wait
                posted.append(self._post(k))
        for k in range(n):
            if self.recv_channel is None:
                x = dict(inputs[k])
            else:
                t0 = time.perf_counter()
                pending = posted.popleft()
                if self.receive is not None:
                    x = self.receive(pending)
                elif self.static_inputs is None:
                    x = pending.wait()
                else:
                    x = pending.wait_into(self.static_inputs)
                recv_wait += time.perf_counter() - t0
                if k + self.depth < n:  # keep `depth` receives posted while computing k
                    posted.append(self._post(k + self.depth))
            t0 = time.perf_counter()
            with torch.no_grad():
                y = self.module(x)
            compute += time.perf_counter() - t0
            del x  # the received payload buffer can go as soon as the stage is done with it
            if self.send_channel is None:
                outputs.append(y)
                continue
            t0 = time.perf_counter()
            while len(sends) >= self.depth:  # back-pressure: at most `depth` sends pending
                for h in sends.popleft():
                    h.wait()
            send_wait += time.perf_counter() - t0
            sends.append(self.send_channel.isend(y))  # copies y; returns at once
        self.last_times = StageTimes(
            n, time.perf_counter() - t_start, compute, recv_wait, send_wait
        )
        return outputs
