"""Wire options of a channel: which keys travel folded or as fp8, and what a receiver accepts.

One :class:`Wire` value names them. On a sender (``TensorDictChannel(wire=...)``) it says what
to send; on a receiver (``accept_wire=...``) what it takes. Every hop says in its tensor table
which wire code each key used (:mod:`pipepack.pp.wire.hop`), so a receiver never guesses: a key
that travelled in a form the receiver did not accept is refused, naming the key and both
sides' options. Pure and process-free, like the rest of this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .hop import (
    WIRE_FOLD_SUM,
    WIRE_FOLD_SUM_FP8,
    WIRE_FOLDED,
    WIRE_FP8,
    WIRE_NAMES,
    TensorDesc,
)
from .limits import WireError

__all__ = ["Wire"]


@dataclass(frozen=True)
class Wire:
    """Keys of a hop that travel in another form than their own bytes.

    ``fold=(hidden, residual)``: the hop carries ``hidden + residual`` (rounded to the model
    dtype) under ``hidden`` and nothing for ``residual``: half the activation bytes, exact. Only
    for a receiver whose first op is ``residual = hidden + residual; x = rmsnorm(residual) *
    weight`` (every vLLM / sglang decoder layer): it receives the sum as its new residual, bit
    for bit what its own add would have produced.

    ``fp8=(key, ...)``: those [T, H] bf16 / fp16 / fp32 tensors travel as float8_e4m3fn codes
    with one fp32 scale per row and come back in their own dtype. **Lossy**
    (:func:`pipepack.kernels.pack_wire` says how much); never a default. The fold's ``hidden``
    may be one of them (the sum is quantised); on a sender its ``residual`` may not (it does
    not travel).

    A receiver's ``Wire`` accepts a hop whose options are a subset of it, plain keys always:
    ``Wire(fold=("h", "r"), fp8=("h", "r"))`` takes plain hops, folded ones, fp8 ones with or
    without the fold.
    """

    fold: tuple[str, str] | None = None
    fp8: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fold = self.fold
        if fold is not None:
            if (
                not isinstance(fold, (tuple, list))
                or len(fold) != 2
                or any(type(k) is not str for k in fold)
            ):
                raise TypeError(f"fold must be a (hidden, residual) pair of keys, got {fold!r}")
            if fold[0] == fold[1]:
                raise ValueError(f"fold names key {fold[0]!r} twice")
            object.__setattr__(self, "fold", (fold[0], fold[1]))
        fp8 = self.fp8
        if isinstance(fp8, str) or not isinstance(fp8, Sequence):
            raise TypeError(
                f"fp8 must be a sequence of keys, e.g. fp8=('hidden_states',); got {fp8!r}"
            )
        fp8 = tuple(fp8)
        for k in fp8:
            if type(k) is not str:
                raise TypeError(f"fp8 keys must be str, got {k!r} ({type(k).__name__})")
        if len(set(fp8)) != len(fp8):
            raise ValueError(f"fp8 names a key twice: {fp8!r}")
        object.__setattr__(self, "fp8", fp8)

    def __bool__(self) -> bool:
        return self.fold is not None or bool(self.fp8)

    def check_sender(self) -> None:
        """Raises ValueError when these options cannot be sent as they are."""
        if self.fold is not None and self.fold[1] in self.fp8:
            raise ValueError(
                f"key {self.fold[1]!r} is the folded residual, it does not travel: quantise "
                f"the fold's hidden key {self.fold[0]!r} instead"
            )

    def codes(self) -> dict[str, int]:
        """The wire code each named key travels with (for a sender)."""
        out = {k: WIRE_FP8 for k in self.fp8}
        if self.fold is not None:
            h, r = self.fold
            out[h] = WIRE_FOLD_SUM_FP8 if h in self.fp8 else WIRE_FOLD_SUM
            out[r] = WIRE_FOLDED
        return out

    def describe(self) -> str:
        parts = []
        if self.fold is not None:
            parts.append(f"fold={self.fold!r}")
        if self.fp8:
            parts.append(f"fp8={self.fp8!r}")
        return f"Wire({', '.join(parts)})" if parts else "plain tensors only"

    @staticmethod
    def of_hop(wired: Sequence[tuple[str, TensorDesc]]) -> Wire:
        """The options a hop was sent with, from its keys' wire codes."""
        fold_h = fold_r = None
        fp8 = []
        for k, t in wired:
            if t.wire in (WIRE_FOLD_SUM, WIRE_FOLD_SUM_FP8):
                fold_h = k
            elif t.wire == WIRE_FOLDED:
                fold_r = k
            if t.wire in (WIRE_FP8, WIRE_FOLD_SUM_FP8):
                fp8.append(k)
        fold = (fold_h, fold_r) if fold_h is not None and fold_r is not None else None
        return Wire(fold, tuple(fp8))

    def accepts(self, key: str, code: int) -> bool:
        """Whether this receiver takes ``key`` sent with wire ``code``."""
        fold = self.fold
        if code == WIRE_FOLD_SUM:
            return fold is not None and fold[0] == key
        if code == WIRE_FOLDED:
            return fold is not None and fold[1] == key
        if code == WIRE_FP8:
            return key in self.fp8
        if code == WIRE_FOLD_SUM_FP8:
            return fold is not None and fold[0] == key and key in self.fp8
        return code == 0

    def check(self, wired: Sequence[tuple[str, TensorDesc]]) -> None:
        """Raises :class:`WireError` naming the first key this receiver does not take."""
        for k, t in wired:
            if not self.accepts(k, t.wire):
                raise WireError(
                    f"key {k!r} travelled as {WIRE_NAMES.get(t.wire, t.wire)}: the sender's "
                    f"wire options are {Wire.of_hop(wired).describe()}, this receiver accepts "
                    f"{self.describe()} (TensorDictChannel accept_wire=)"
                )
