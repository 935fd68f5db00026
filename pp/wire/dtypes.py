"""The wire code of every dtype a payload may carry: one append-only table.

A code is never reused or renumbered. Only dtypes the kernels move
(:data:`pipepack.kernels.SUPPORTED_DTYPES`) get a code on this torch build, so a dtype either
travels exactly or is refused on the sender by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from pipepack.kernels import SUPPORTED_DTYPES

__all__ = ["DTYPE_CODES", "dtype_of_code"]

_TABLE = (
    (1, "bool"),
    (2, "uint8"),
    (3, "int8"),
    (4, "int16"),
    (5, "int32"),
    (6, "int64"),
    (7, "uint16"),
    (8, "uint32"),
    (9, "uint64"),
    (10, "float16"),
    (11, "bfloat16"),
    (12, "float32"),
    (13, "float64"),
    (14, "complex32"),
    (15, "complex64"),
    (16, "complex128"),
    (17, "float8_e4m3fn"),
    (18, "float8_e5m2"),
    (19, "float8_e4m3fnuz"),
    (20, "float8_e5m2fnuz"),
)


def _build() -> tuple[dict[torch.dtype, int], dict[int, torch.dtype]]:
    to_code: dict[torch.dtype, int] = {}
    from_code: dict[int, torch.dtype] = {}
    for code, name in _TABLE:
        dt = getattr(torch, name, None)  # older torch builds lack some of the newer dtypes
        if isinstance(dt, torch.dtype) and dt in SUPPORTED_DTYPES:
            to_code[dt] = code
            from_code[code] = dt
    return to_code, from_code


_TO_CODE, _FROM_CODE = _build()
DTYPE_CODES: Mapping[torch.dtype, int] = MappingProxyType(_TO_CODE)


def dtype_of_code(code: int) -> torch.dtype | None:
    return _FROM_CODE.get(code)
