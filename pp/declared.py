"""A schema fixed for a run, checked on both ends of a channel (never assumed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Declared"]


def _is_spec(spec: Any) -> bool:
    return type(spec) is tuple and len(spec) == 3 and isinstance(spec[0], torch.dtype)


@dataclass(frozen=True)
class Declared:
    """A schema fixed for the run: keys, dtypes, devices, trailing dims, constants.

    ``fields`` maps each key, in order, to a ``(dtype, shape, device_type)`` triple whose shape
    may hold ``None`` in dim 0 (the token count, given per call) or to a constant plain value
    (``__msg_type__`` and the like). The sender checks every dict against it (and a token count
    above ``max_tokens``) before anything is sent; the receiver checks every hop against it and
    against the token count its ``irecv`` was given. Hops still describe themselves: two ends
    that declare differently get an error naming both values, never wrong bytes.
    """

    fields: tuple[tuple[str, Any], ...]
    max_tokens: int | None = None

    @staticmethod
    def from_example(
        example: Mapping[str, Any],
        *,
        dynamic: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> Declared:
        """Declares ``example``'s keys, dtypes, devices and trailing dims.

        Dim 0 of the tensors named in ``dynamic`` (default: every tensor with a dim) is the
        per-call token count; plain values are constants.
        """
        fields = []
        for k, v in example.items():
            if not isinstance(k, str):
                raise TypeError(f"tensor dict keys must be str, got {k!r} ({type(k).__name__})")
            if isinstance(v, torch.Tensor):
                dyn = v.dim() > 0 and (dynamic is None or k in dynamic)
                shape = ((None,) + tuple(v.shape[1:])) if dyn else tuple(v.shape)
                fields.append((k, (v.dtype, shape, v.device.type)))
            else:
                fields.append((k, v))
        return Declared(tuple(fields), max_tokens)

    def is_tensor(self, spec: Any) -> bool:
        return _is_spec(spec)

    def check(self, d: Mapping[str, Any], side: str = "") -> int:
        """Checks a dict against the declaration (naming the key); returns its token count."""
        items = []
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                items.append((k, (v.dtype, tuple(v.shape), v.device.type), None))
            else:
                items.append((k, None, v))
        return self.check_items(items, side)

    def check_items(self, items: Sequence[tuple[str, tuple | None, Any]], side: str = "") -> int:
        """Like :meth:`check`, on ``(key, (dtype, shape, device_type) or None, value)``."""
        fields = self.fields
        if len(items) != len(fields) or any(it[0] != f[0] for it, f in zip(items, fields)):
            raise ValueError(
                f"{side}keys {[it[0] for it in items]} do not match the declared "
                f"keys {[k for k, _ in fields]}"
            )
        tokens = None
        for (k, spec), (_, got, v) in zip(fields, items):
            if _is_spec(spec):
                dtype, shape, dev = spec
                if got is None:
                    raise TypeError(f"{side}key {k!r}: declared a tensor, got {type(v).__name__}")
                vdtype, vshape, vdev = got
                if vdtype != dtype or vdev != dev or len(vshape) != len(shape):
                    raise ValueError(
                        f"{side}key {k!r}: {vdtype} {vshape} on {vdev} "
                        f"does not match the declared {dtype} {shape} on {dev}"
                    )
                for i, (a, b) in enumerate(zip(vshape, shape)):
                    if b is None:
                        if tokens is None:
                            tokens = a
                        elif a != tokens:
                            raise ValueError(
                                f"{side}key {k!r}: dim {i} is {a} but another key "
                                f"has {tokens} tokens"
                            )
                    elif a != b:
                        raise ValueError(
                            f"{side}key {k!r}: shape {vshape} does not match the declared {shape}"
                        )
            elif got is not None:
                raise ValueError(
                    f"{side}key {k!r}: a tensor differs from the declared constant {spec!r}"
                )
            elif not (type(v) is type(spec) and v == spec):
                raise ValueError(
                    f"{side}key {k!r}: value {v!r} differs from the declared constant {spec!r}"
                )
        tokens = 0 if tokens is None else tokens
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise ValueError(
                f"{side}{tokens} tokens exceed the declared max_tokens={self.max_tokens}"
            )
        return tokens
