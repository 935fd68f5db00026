"""The wire format, pure and process-free: frames, header bodies, plain values, limits.

``hop`` lays out one hop (see its docstring for the byte diagram); ``values`` is the tagged
plain-value codec; ``dtypes`` the append-only dtype code table; ``limits`` what a peer may make
this side allocate or decode.
"""

from .dtypes import DTYPE_CODES, dtype_of_code
from .hop import (
    DEVICE_CODES,
    F_INLINE,
    F_PICKLED,
    F_SLICED,
    FRAME_BYTES,
    MAGIC,
    VERSION,
    Frame,
    Schema,
    TensorDesc,
    align16,
    decode_frame,
    decode_schema,
    encode_body,
    encode_frame,
)
from .limits import DEFAULT_LIMITS, Limits, WireError
from .values import decode_value, encode_value

__all__ = [
    "DTYPE_CODES",
    "dtype_of_code",
    "DEVICE_CODES",
    "F_INLINE",
    "F_PICKLED",
    "F_SLICED",
    "FRAME_BYTES",
    "MAGIC",
    "VERSION",
    "Frame",
    "Schema",
    "TensorDesc",
    "align16",
    "decode_frame",
    "decode_schema",
    "encode_body",
    "encode_frame",
    "DEFAULT_LIMITS",
    "Limits",
    "WireError",
    "decode_value",
    "encode_value",
]
