"""Exact comparisons of received tensor dicts, shared by the transport test modules."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import torch


def random_bytes(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A CPU tensor of ``shape`` whose bytes are random (NaN payloads, -0.0 and denormals
    included); a bool holds only 0 and 1, the values a bool may have."""
    n = dtype.itemsize
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparison (NaN payloads and -0.0 included).

    clone, not contiguous(): an empty tensor with a non-unit stride counts as contiguous but
    cannot be viewed as bytes.
    """
    return t.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def check_tensor(got: Any, want: torch.Tensor, key: str) -> None:
    assert isinstance(got, torch.Tensor), f"{key}: got {type(got).__name__}, not a tensor"
    assert got.dtype == want.dtype, f"{key}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{key}: shape {got.shape} != {want.shape}"
    assert got.device.type == want.device.type, f"{key}: device {got.device} != {want.device}"
    if want.device.type != "meta":  # meta tensors have no bytes to compare
        assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{key}: bytes differ"


def check_plain(got: Any, want: Any, path: str) -> None:
    """Equal values of exactly the same types, floats compared by their bits, tensors nested
    in lists/tuples/dicts bit-exact."""
    if isinstance(want, torch.Tensor):
        check_tensor(got, want, path)
        return
    assert type(got) is type(want), f"{path}: type {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            check_plain(a, b, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            check_plain(got[k], want[k], f"{path}[{k!r}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def check_dict(got: Any, want: Mapping[str, Any], *, contiguous: bool = False) -> None:
    """Same keys in the same order, tensors bit-exact, plain values of the same types.

    ``contiguous``: also require every received tensor to be contiguous (views of a packed
    payload always are).
    """
    assert isinstance(got, dict), f"received {type(got).__name__}, not a dict"
    assert list(got) == list(want), f"key order {list(got)} != {list(want)}"
    for k, w in want.items():
        if isinstance(w, torch.Tensor):
            check_tensor(got[k], w, repr(k))
            if contiguous:
                assert got[k].is_contiguous(), f"{k!r}: received view is not contiguous"
        else:
            check_plain(got[k], w, repr(k))
