"""The private torch APIs pipepack relies on, in one place, each with why and a self-check.

Receive buffers are handed out as zero-copy views; a buffer may be written again only when
nothing can still read it: no tensor (view) on its storage and no Python storage object of it
(``t.untyped_storage()`` kept by a caller). torch has no public way to ask that, so
:func:`unshared` combines the C++ storage use count (``torch._C._storage_Use_Count``, which
counts tensors) with the Python refcount of the storage object (torch keeps one Python object
per storage, so a caller that kept ``untyped_storage()`` holds a reference to it). Both are
checked at import against their expected behaviour; if either misbehaves on this torch build,
:data:`REUSE_OK` is False and buffers are simply never reused.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["REUSE_OK", "unshared"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _counts(buf: torch.Tensor) -> tuple[int, int]:
    s = buf.untyped_storage()
    return _use_count(s._cdata), sys.getrefcount(s)


def _self_check() -> tuple[int, int] | None:
    if _use_count is None:
        return None
    try:
        t = torch.empty(64, dtype=torch.uint8)
        base = _counts(t)
        v = t[8:]
        with_view = _counts(t)
        del v
        s = t[:4].untyped_storage()
        with_storage = _counts(t)
        del s
        after = _counts(t)
        if with_view[0] == base[0] + 1 and with_storage[1] == base[1] + 1 and after == base:
            return base
    except Exception:  # noqa: BLE001 - any surprise: never reuse
        pass
    return None


_BASE = _self_check()
REUSE_OK = _BASE is not None


def unshared(buf: torch.Tensor) -> bool:
    """True when ``buf`` (a whole-storage tensor held by exactly one reference, the caller's)
    is the only thing that can read its bytes."""
    if _BASE is None:
        return False
    return _counts(buf) == _BASE
