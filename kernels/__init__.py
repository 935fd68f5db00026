"""Triton pack/unpack kernels and their pure-torch references.

``pack`` copies a list of tensors into one byte buffer laid out by ``plan_layout``; ``unpack``
hands out zero-copy views; ``unpack_into`` and ``reassemble_into`` copy into caller-owned
destinations; ``reassemble`` rebuilds TP-sliced tensors after one all-gather. On CUDA each op
is one kernel launch.
"""

from .fused import (
    WireLayout,
    add_rmsnorm_reference,
    dequantize_fp8,
    dequantize_fp8_reference,
    pack_wire,
    pack_wire_reference,
    plan_wire,
    quantize_fp8_reference,
    unpack_add_rmsnorm,
    unpack_add_rmsnorm_reference,
)
from .layout import SUPPORTED_DTYPES, Entry, Layout, plan_layout
from .ops import (
    clear_plan_cache,
    pack,
    pack_reference,
    reassemble,
    reassemble_into,
    reassemble_reference,
    unpack,
    unpack_into,
    unpack_into_reference,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "Entry",
    "Layout",
    "plan_layout",
    "pack",
    "pack_reference",
    "unpack",
    "unpack_into",
    "unpack_into_reference",
    "reassemble",
    "reassemble_into",
    "reassemble_reference",
    "clear_plan_cache",
    "WireLayout",
    "plan_wire",
    "pack_wire",
    "pack_wire_reference",
    "unpack_add_rmsnorm",
    "unpack_add_rmsnorm_reference",
    "add_rmsnorm_reference",
    "dequantize_fp8",
    "quantize_fp8_reference",
    "dequantize_fp8_reference",
]
