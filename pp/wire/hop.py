"""One hop on the wire: a fixed 64-byte frame, the header body, then the payloads.

A hop's first message is the *head*: the frame, then the body, then (``INLINE``) the whole CPU
payload. The receiver posts the head's receive before the peer sends, at a capacity it told the
peer once at channel setup; gloo lets a shorter message fill a larger receive, so the head never
needs a size both ends must agree on. Everything else the hop sends is announced in the frame,
read only from it, and checked against :class:`Limits` before a byte of it is received::

    frame (64 bytes, little-endian)
    off size field
    0   4    magic b"PPK2"
    4   2    version (2)
    6   2    flags: 1 INLINE (the CPU payload is in the head), 2 PICKLED (a plain value is
             pickled), 4 SLICED (some tensor is a TP slice), 8 SWITCH (alone, in a bare frame:
             hop ``seq`` and all later ones travel through the receiver's shared-memory ring,
             laid out exactly like an INLINE head); other bits 0
    8   8    seq: the sender's hop number on this link (0, 1, 2, ...)
    16  4    head_len: bytes of the head message
    20  4    body_len: bytes of the header body
    24  8    cpu_nbytes: bytes of the CPU payload
    32  4    chunk_bytes: size of each CPU payload message when not INLINE (last one shorter)
    36  1    dev_code: device type of the accelerator payload (0: none)
    37  1    0
    38  2    tp_world: ranks of the sender's all-gather group (1: no slicing)
    40  8    dev_nbytes: bytes of the accelerator payload (one message on the device group)
    48  16   0

    head = frame | body[: head_len - 64]                     (not INLINE)
         = frame | body | pad to 16 | CPU payload             (INLINE)
    then, in order on the data tag: the rest of the body (one message, if any), the CPU
    payload in chunk_bytes messages (not INLINE); then the device payload on the device group.

    body
    u16 n_keys, u16 n_tensors, u32 values_len
    per key:    u16 key_len, key utf-8, u8 kind (0 plain value, 1 tensor)
    per tensor: u8 dtype code, u8 ndim, u8 device code, u8 flags
                flags bit 0: TP slice; bits 1-4: wire code (below); bits 5-7: 0
    int64 dims of every tensor, in tensor order
    values: the encoded plain values of the plain keys, in key order

    wire code of a tensor (dtype and dims are always the tensor's own, the receiver's result)
    0  plain           its bytes as they are
    1  fold sum        [T, H] bf16/fp16/fp32: hidden + residual, rounded to the dtype, where
                       the hidden key's tensor lies; the residual key has code 2
    2  folded          [T, H], same dtype and dims as the code-1 tensor: 0 bytes travel (its
                       values went into the fold sum)
    3  fp8 rows        [T, H] bf16/fp16/fp32 as T*H float8_e4m3fn codes, zero padding to a
                       multiple of 16, then T fp32 row scales (value = code * scale)
    4  fold sum, fp8   code 1's sum, travelling as code 3 does
    other codes are refused. Codes 1-4 are top-level, 2-D, bf16/fp16/fp32, not on meta; at most
    one code-1/4 tensor and exactly as many code-2 ones, of the same dtype and dims; only codes
    0 and 1 may be TP slices. In the payload layout a tensor takes the bytes that travel: code 2
    none, codes 3 and 4 one uint8 entry of align16(T*H) + 4*T bytes.

Tensors are numbered top-level keys first (in key order), then tensors nested in plain values
in the order the values reference them (a value's tensor tag holds the number among the nested
ones, from 0). Each device type's tensors lie in one payload buffer,
in tensor order, at 16-byte aligned offsets (:func:`pipepack.kernels.plan_layout`); with TP
slicing the sliced ones come first (``Layout.sliced``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dtypes import DTYPE_CODES, dtype_of_code
from .limits import Limits, WireError

__all__ = [
    "FRAME_BYTES",
    "MAGIC",
    "VERSION",
    "F_INLINE",
    "F_PICKLED",
    "F_SLICED",
    "F_SWITCH",
    "DEVICE_CODES",
    "Frame",
    "encode_frame",
    "pack_frame",
    "decode_frame",
    "TensorDesc",
    "Schema",
    "encode_body",
    "body_head",
    "BODY_HEAD_BYTES",
    "decode_schema",
    "align16",
    "WIRE_PLAIN",
    "WIRE_FOLD_SUM",
    "WIRE_FOLDED",
    "WIRE_FP8",
    "WIRE_FOLD_SUM_FP8",
    "WIRE_NAMES",
    "SLICEABLE_WIRE",
    "wire_spec",
]

MAGIC = b"PPK2"
VERSION = 2
F_INLINE, F_PICKLED, F_SLICED, F_SWITCH = 1, 2, 4, 8
_F_ALL = F_INLINE | F_PICKLED | F_SLICED | F_SWITCH
_FRAME = struct.Struct("<4sHHQIIQIBBHQQQ")
FRAME_BYTES = _FRAME.size
assert FRAME_BYTES == 64
MIN_CHUNK_BYTES = 4096
MAX_CHUNKS = 1 << 20

DEVICE_CODES: dict[str, int] = {"cpu": 0, "cuda": 1, "meta": 2, "xpu": 3, "hpu": 4, "mps": 5}
_DEVICE_NAMES = {v: k for k, v in DEVICE_CODES.items()}

# wire codes of a tensor (bits 1-4 of its flags byte; see the module docstring)
WIRE_PLAIN, WIRE_FOLD_SUM, WIRE_FOLDED, WIRE_FP8, WIRE_FOLD_SUM_FP8 = 0, 1, 2, 3, 4
WIRE_NAMES = {
    WIRE_PLAIN: "plain",
    WIRE_FOLD_SUM: "fold sum",
    WIRE_FOLDED: "folded",
    WIRE_FP8: "fp8",
    WIRE_FOLD_SUM_FP8: "fold sum as fp8",
}
SLICEABLE_WIRE = (WIRE_PLAIN, WIRE_FOLD_SUM)  # the codes a TP slice may have
_FOLD_SUMS = (WIRE_FOLD_SUM, WIRE_FOLD_SUM_FP8)
_FP8_CODES = (WIRE_FP8, WIRE_FOLD_SUM_FP8)
_WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_BODY_HEAD = struct.Struct("<HHI")
_KEY_HEAD = struct.Struct("<H")
_TENSOR = struct.Struct("<BBBB")


def align16(n: int) -> int:
    return (n + 15) & ~15


@dataclass(frozen=True)
class Frame:
    flags: int
    seq: int
    head_len: int
    body_len: int
    cpu_nbytes: int
    chunk_bytes: int
    dev_type: str | None
    tp_world: int
    dev_nbytes: int

    @property
    def inline(self) -> bool:
        return bool(self.flags & F_INLINE)

    @property
    def body_in_head(self) -> int:
        return self.body_len if self.inline else self.head_len - FRAME_BYTES

    @property
    def cpu_offset(self) -> int:
        """Where the CPU payload starts in the head (INLINE only)."""
        return align16(FRAME_BYTES + self.body_len)

    def cpu_chunks(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each CPU payload message (none when INLINE)."""
        if self.inline or not self.cpu_nbytes:
            return []
        c = self.chunk_bytes
        return [(s, min(s + c, self.cpu_nbytes)) for s in range(0, self.cpu_nbytes, c)]


def pack_frame(
    flags: int,
    seq: int,
    head_len: int,
    body_len: int,
    cpu_nbytes: int,
    chunk_bytes: int,
    dev_type: str | None,
    tp_world: int,
    dev_nbytes: int,
) -> bytes:
    """The 64 bytes of a frame with these fields (what :func:`encode_frame` writes)."""
    dev = 0 if dev_type is None else DEVICE_CODES[dev_type]
    return _FRAME.pack(
        MAGIC,
        VERSION,
        flags,
        seq,
        head_len,
        body_len,
        cpu_nbytes,
        chunk_bytes,
        dev,
        0,
        tp_world,
        dev_nbytes,
        0,
        0,
    )


def encode_frame(f: Frame) -> bytes:
    return pack_frame(
        f.flags,
        f.seq,
        f.head_len,
        f.body_len,
        f.cpu_nbytes,
        f.chunk_bytes,
        f.dev_type,
        f.tp_world,
        f.dev_nbytes,
    )


def decode_frame(data: bytes, *, capacity: int, limits: Limits) -> Frame:
    """Parses and validates a head's frame; every size in it is then safe to post."""
    if len(data) < FRAME_BYTES:
        raise WireError(f"frame: {len(data)} bytes, a frame has {FRAME_BYTES}")
    (
        magic,
        version,
        flags,
        seq,
        head_len,
        body_len,
        cpu_nbytes,
        chunk,
        dev,
        r0,
        tp_world,
        dev_nbytes,
        r1,
        r2,
    ) = _FRAME.unpack_from(data)
    if magic != MAGIC:
        raise WireError(
            f"frame: magic {magic!r}, expected {MAGIC!r} (is the peer running "
            "pipepack 0.2 or later?)"
        )
    if version != VERSION:
        raise WireError(f"frame: wire version {version}, this side speaks {VERSION}")
    if flags & ~_F_ALL or r0 or r1 or r2:
        raise WireError(f"frame: unknown flags {flags:#x} or nonzero reserved fields")
    if not FRAME_BYTES <= head_len <= capacity:
        raise WireError(
            f"frame: head_len {head_len} outside [{FRAME_BYTES}, {capacity}] "
            "(this side's head capacity)"
        )
    if body_len > limits.max_header_bytes:
        raise WireError(
            f"frame: header body of {body_len} bytes exceeds the limit {limits.max_header_bytes}"
        )
    for name, n in (("cpu_nbytes", cpu_nbytes), ("dev_nbytes", dev_nbytes)):
        if n > limits.max_payload_bytes:
            raise WireError(
                f"frame: {name} {n} exceeds max_payload_bytes={limits.max_payload_bytes}"
            )
    dev_type = None
    if dev:
        dev_type = _DEVICE_NAMES.get(dev)
        if dev_type is None or dev_type in ("cpu", "meta"):
            raise WireError(f"frame: unknown accelerator device code {dev}")
    elif dev_nbytes:
        raise WireError(f"frame: {dev_nbytes} device payload bytes without a device type")
    if not 1 <= tp_world:
        raise WireError("frame: tp_world 0")
    if flags & F_SWITCH:
        if (
            flags != F_SWITCH
            or head_len != FRAME_BYTES
            or body_len
            or cpu_nbytes
            or chunk
            or dev
            or dev_nbytes
            or tp_world != 1
        ):
            raise WireError("frame: a SWITCH frame carries nothing else")
    elif flags & F_INLINE:
        if head_len != align16(FRAME_BYTES + body_len) + cpu_nbytes or chunk:
            raise WireError(
                f"frame: INLINE head_len {head_len} does not hold a body of "
                f"{body_len} and a payload of {cpu_nbytes} bytes"
            )
    else:
        if head_len - FRAME_BYTES > body_len:
            raise WireError(
                f"frame: head of {head_len} bytes is longer than frame + body ({body_len})"
            )
        if cpu_nbytes and not (
            MIN_CHUNK_BYTES <= chunk and chunk % 16 == 0 and -(-cpu_nbytes // chunk) <= MAX_CHUNKS
        ):
            raise WireError(f"frame: chunk_bytes {chunk} for a payload of {cpu_nbytes} bytes")
        if not cpu_nbytes and chunk:
            raise WireError("frame: chunk_bytes without a CPU payload")
    return Frame(flags, seq, head_len, body_len, cpu_nbytes, chunk, dev_type, tp_world, dev_nbytes)


@dataclass(frozen=True)
class TensorDesc:
    dtype: torch.dtype
    shape: tuple[int, ...]
    device_type: str
    sliced: bool
    wire: int = WIRE_PLAIN  # how its bytes travel (a WIRE_* code)

    @property
    def wire_spec(self) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of the bytes that travel, as the payload layout holds them."""
        return wire_spec(self.dtype, self.shape, self.wire)


def wire_spec(
    dtype: torch.dtype, shape: tuple[int, ...], code: int
) -> tuple[torch.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` of the payload entry of a tensor sent with wire ``code``."""
    if code in (WIRE_PLAIN, WIRE_FOLD_SUM):
        return dtype, shape
    if code == WIRE_FOLDED:
        return dtype, (0,)
    t, h = shape
    return torch.uint8, (align16(t * h) + 4 * t,)


@dataclass(frozen=True)
class Schema:
    """The decoded first part of a body: keys, their kinds, the tensor table."""

    keys: tuple[str, ...]
    is_tensor: tuple[bool, ...]
    tensors: tuple[TensorDesc, ...]
    values_at: int  # offset of the values in the body
    values_len: int


BODY_HEAD_BYTES = _BODY_HEAD.size


def body_head(n_keys: int, n_tensors: int, values_len: int) -> bytes:
    """The first bytes of a body: its key and tensor counts and the plain values' length."""
    return _BODY_HEAD.pack(n_keys, n_tensors, values_len)


def encode_body(
    keys: Sequence[bytes],
    is_tensor: Sequence[bool],
    tensors: Sequence[tuple[int, int, int, int]],
    dims: Sequence[int],
    values: bytes,
) -> bytes:
    """``keys`` utf-8 encoded; ``tensors`` as (dtype code, ndim, device code, flags)."""
    parts = [_BODY_HEAD.pack(len(keys), len(tensors), len(values))]
    for kb, t in zip(keys, is_tensor):
        parts.append(_KEY_HEAD.pack(len(kb)))
        parts.append(kb)
        parts.append(b"\x01" if t else b"\x00")
    for t in tensors:
        parts.append(_TENSOR.pack(*t))
    parts.append(struct.pack(f"<{len(dims)}q", *dims))
    parts.append(values)
    return b"".join(parts)


def decode_schema(body: bytes, *, limits: Limits) -> Schema:
    """Decodes and validates keys, the tensor table and the shapes of a body."""
    try:
        n_keys, n_tensors, values_len = _BODY_HEAD.unpack_from(body, 0)
        if n_keys + n_tensors > limits.max_entries:
            raise WireError(
                f"header: {n_keys} keys and {n_tensors} tensors exceed "
                f"max_entries={limits.max_entries}"
            )
        pos = _BODY_HEAD.size
        keys, kinds = [], []
        for _ in range(n_keys):
            (n,) = _KEY_HEAD.unpack_from(body, pos)
            pos += 2
            if n > limits.max_key_bytes:
                raise WireError(
                    f"header: key of {n} bytes exceeds max_key_bytes={limits.max_key_bytes}"
                )
            kb = body[pos : pos + n]
            if len(kb) != n:
                raise WireError("header: truncated key")
            try:
                keys.append(kb.decode("utf-8"))
            except UnicodeDecodeError:
                raise WireError(f"header: key {kb[:40]!r} is not valid utf-8") from None
            if pos + n >= len(body):
                raise WireError("header: truncated after a key")
            kind = body[pos + n]
            if kind > 1:
                raise WireError(f"header: key {keys[-1]!r} has unknown kind {kind}")
            kinds.append(kind == 1)
            pos += n + 1
        if len(set(keys)) != n_keys:
            raise WireError("header: duplicate keys")
        n_top = sum(kinds)
        if n_top > n_tensors:
            raise WireError(f"header: {n_top} tensor keys but a tensor table of {n_tensors}")
        descs = []
        for _ in range(n_tensors):
            descs.append(_TENSOR.unpack_from(body, pos))
            pos += 4
        ndims = [d[1] for d in descs]
        if any(n > limits.max_ndim for n in ndims):
            raise WireError(f"header: a tensor has more than max_ndim={limits.max_ndim} dims")
        total = sum(ndims)
        dims = struct.unpack_from(f"<{total}q", body, pos)
        pos += 8 * total
    except struct.error as e:
        raise WireError(f"header: truncated ({e})") from None
    if pos + values_len != len(body):
        raise WireError(f"header: body of {len(body)} bytes, its fields need {pos + values_len}")
    tensors = []
    at = 0
    for i, (code, ndim, dev, flags) in enumerate(descs):
        dtype = dtype_of_code(code)
        if dtype is None:
            raise WireError(f"header: tensor {i} has unknown dtype code {code}")
        name = _DEVICE_NAMES.get(dev)
        if name is None:
            raise WireError(f"header: tensor {i} has unknown device code {dev}")
        if flags >> 5 or (flags and i >= n_top):
            raise WireError(f"header: tensor {i} has bad flags {flags:#x}")
        sliced, wire = bool(flags & 1), flags >> 1
        if wire:
            if wire not in WIRE_NAMES:
                raise WireError(f"header: tensor {i} has unknown wire code {wire}")
            if dtype not in _WIRE_DTYPES or ndim != 2 or name == "meta":
                raise WireError(
                    f"header: tensor {i} ({dtype}, {ndim} dims, on {name}) cannot travel as "
                    f"{WIRE_NAMES[wire]}: that takes a [T, H] bf16, fp16 or fp32 tensor"
                )
            if sliced and wire not in SLICEABLE_WIRE:
                raise WireError(
                    f"header: tensor {i} travels as {WIRE_NAMES[wire]} and cannot be a TP slice"
                )
        shape = dims[at : at + ndim]
        at += ndim
        span = dtype.itemsize
        for d in shape:
            if d < 0:
                raise WireError(f"header: tensor {i} has a negative dim in {shape}")
            span *= max(d, 1)
        if wire in _FP8_CODES:  # codes and row scales: not bounded by the dtype's span
            span = max(span, align16(shape[0] * shape[1]) + 4 * shape[0])
        if span > limits.max_payload_bytes:  # also bounds the dims of empty tensors
            raise WireError(
                f"header: tensor {i} of shape {shape} is out of range for "
                f"max_payload_bytes={limits.max_payload_bytes}"
            )
        tensors.append(TensorDesc(dtype, tuple(shape), name, sliced, wire))
    sums = [t for t in tensors if t.wire in _FOLD_SUMS]
    folded = [t for t in tensors if t.wire == WIRE_FOLDED]
    if sums or folded:
        same = [(t.dtype, t.shape, t.device_type) for t in sums + folded]
        if len(sums) != 1 or len(folded) != 1 or same[0] != same[1]:
            raise WireError(
                f"header: a fold takes one fold-sum and one folded tensor of the same dtype, "
                f"dims and device; this table has {len(sums)} and {len(folded)}: {same}"
            )
    return Schema(tuple(keys), tuple(kinds), tuple(tensors), pos, values_len)


def tensor_desc_code(
    t: torch.Tensor, sliced: bool, key: str, wire: int = WIRE_PLAIN
) -> tuple[int, int, int, int]:
    """``wire``: the tensor's WIRE_* code (the caller checked that ``t`` may travel so)."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"key {key!r}: unsupported dtype {t.dtype}")
    dev = DEVICE_CODES.get(t.device.type)
    if dev is None:
        raise TypeError(f"key {key!r}: tensors on {t.device.type} cannot travel")
    return code, t.dim(), dev, (1 if sliced else 0) | wire << 1
