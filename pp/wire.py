"""Header wire format: the pure, process-free encoder/decoder of one pipeline hop's metadata.

A hop sends a dict (``str`` -> tensor or plain value) as ONE fixed-size *slot* message of
exactly ``slot_bytes`` bytes, optionally ONE *overflow* message, then the tensor payloads (one
per device type). The slot has a fixed size so the receiver can post its irecv before it knows
anything (gloo aborts on a too-small receive and half-fills a too-large one; NCCL hangs or
truncates); the slot then announces the exact byte count of everything that follows.

Everything read from a peer is validated: a corrupt or hostile header raises :class:`WireError`
(a ``ValueError``) with a message that says what is wrong. It never runs code (no pickle unless
both sides opt in), never allocates more than the :class:`Limits` allow and never loops longer
than the bytes it was given.

Slot layout (all integers little-endian)::

    offset size  field
    0      4     magic           b"PPK1"
    4      1     version         1
    5      1     flags           bit0 SCHEMA (schema bytes in body), bit1 OVERFLOW,
                                 bit2 INLINE (inline bytes in body); other bits must be 0
    6      2     reserved        0
    8      4     slot_bytes      the sender's slot size (must equal the receiver's)
    12     4     body_len        body bytes stored in this slot (after the prefix)
    16     8     seq             sender's per-peer message counter
    24     8     schema_id       Schema.schema_id() of the schema the body follows
    32     8     fingerprint     free for the transport
    40     8     overflow_len    exact byte size of the overflow message (0 when none)
    48     ...   body[:body_len], then zero padding up to slot_bytes

The *body* is one byte string; when it does not fit in ``slot_bytes - 48`` bytes the slot
carries its first ``slot_bytes - 48`` bytes and the overflow message carries the rest::

    [SCHEMA]  u32 n, n bytes of encode_schema(schema)
              (the receiver checks blake2b-64(bytes) == schema_id)
    shapes    int64 x (sum of TensorField.ndim), in schema order
    payloads  u8 count (<= 8), then per device type: u8 n, n ascii bytes, u64 nbytes
    [INLINE]  u32 n, n bytes
    values    one encoded plain value per PlainField, in schema order (see below)

Schema encoding: u32 field count, then per field ``u8 kind, u16 key_len, key utf-8`` and, for a
tensor field (kind 1), ``u8 dtype code, u8 ndim, u8 flags (bit0 sliced), u8 n, n ascii bytes of
the device type``; a plain field (kind 0) has nothing more. The encoding is canonical: decoding
re-encodes and rejects anything that does not come back byte-identical.

Plain value encoding: a one-byte tag, then::

    1 None | 2 False | 3 True | 4 int64 (8 bytes) | 5 big int: u32 n, n bytes signed LE
    6 float64 (8 bytes, exact bits) | 7 str: u32 n, utf-8 (surrogatepass) | 8 bytes: u32 n, n
    9 list: u32 count, items | 10 tuple: u32 count, items | 11 dict: u32 count, key, value...
    12 torch.dtype: u8 code | 13 torch.Size: u32 count, int64 each | 14 pickle: u32 n, n bytes

Types are dispatched on the *exact* type, so a value never silently changes type on the way:
``bool`` stays ``bool``, ``tuple`` stays ``tuple``, ``torch.Size`` stays ``torch.Size``.
``bytearray`` is the one exception: it is sent as bytes and comes back as ``bytes``. Subclasses
of the supported types (``IntEnum``, ``OrderedDict``, named tuples, ...) and every other object
need ``allow_pickle=True``.

What decoding checks (each failure is a WireError naming the field or key): magic, version,
known flags, zero reserved bits and padding, the peer's slot size, body and overflow lengths
(the overflow against :func:`max_overflow_nbytes` of the receiver's limits, before any byte of
it is received), schema bytes against the schema id, schema field count, key length, duplicate
keys, dtype codes, ndim, device type names; every dim non-negative; each tensor's byte size and
the total per device type <= ``max_payload_bytes``; each announced payload size likewise; at
most 8 payload device types; inline and plain-value bytes <= ``max_plain_bytes``; container
depth, container counts (against the bytes left and ``max_items``), hashable and unique dict
keys; no trailing bytes. Whether ``payload_nbytes`` matches the layout the shapes imply is the
transport's check: it owns the alignment and TP-slicing rules.

Two-step decoding (the transport's receive path)::

    slot = recv(slot_bytes)
    header, n = decode_header(slot, slot_bytes=S, schema_cache=cache)
    if header is None:                      # an overflow message follows, of exactly n bytes
        header, _ = decode_header(slot, recv(n), slot_bytes=S, schema_cache=cache)
    # header.payload_nbytes: the exact size of each payload irecv to post next

Schema caching: the sender sends a schema once per peer; the receiver keeps the schemas it was
sent in a bounded dict (:data:`SCHEMA_CACHE_SIZE`, first-in first-out via :func:`cache_schema`).
The sender must mirror the receiver's cache with the same function and capacity so that both
sides agree on which schemas the receiver still holds (messages to one peer are FIFO, so the
two caches see the same sequence of insertions).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPE_CODES",
    "MAGIC",
    "MAX_DEVICE_TYPES",
    "MIN_SLOT_BYTES",
    "PREFIX_BYTES",
    "SCHEMA_CACHE_SIZE",
    "VERSION",
    "Header",
    "Limits",
    "PlainField",
    "Schema",
    "TensorField",
    "WireError",
    "cache_schema",
    "decode_header",
    "decode_schema",
    "decode_value",
    "encode_header",
    "encode_schema",
    "encode_value",
    "max_overflow_nbytes",
    "overflow_nbytes",
]


class WireError(ValueError):
    """Bytes received from a peer are malformed, inconsistent, or exceed the receiver's limits.

    A subclass of ``ValueError`` so callers that already handle bad values keep working; raised
    for *every* problem found in peer bytes, so a transport needs to catch only this one type.
    """


@dataclass(frozen=True)
class Limits:
    """Receiver-side bounds on what one header may announce or contain.

    They keep a corrupt or hostile peer from making the receiver allocate unbounded memory or
    spend unbounded time. ``max_items`` bounds the total number of container elements in the
    decoded plain values (a byte of ``None`` items would otherwise cost 8 bytes of pointers).
    """

    max_payload_bytes: int = 1 << 36
    max_entries: int = 4096
    max_ndim: int = 16
    max_plain_bytes: int = 64 << 20
    max_depth: int = 32
    max_key_bytes: int = 1024
    max_items: int = 1 << 20

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {v!r}")
        if self.max_ndim > 255:
            raise ValueError("Limits.max_ndim cannot exceed 255 (ndim is one byte on the wire)")
        if self.max_key_bytes > 0xFFFF:
            raise ValueError("Limits.max_key_bytes cannot exceed 65535 (u16 on the wire)")


DEFAULT_LIMITS = Limits()

MAGIC = b"PPK1"
VERSION = 1
_F_SCHEMA = 1
_F_OVERFLOW = 2
_F_INLINE = 4
_F_ALL = _F_SCHEMA | _F_OVERFLOW | _F_INLINE

_PREFIX = struct.Struct("<4sBBHIIQQQQ")
PREFIX_BYTES = _PREFIX.size  # 48
MIN_SLOT_BYTES = 64
MAX_DEVICE_TYPES = 8
SCHEMA_CACHE_SIZE = 64
_MAX_DEVICE_NAME = 16

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_KEY_HEAD = struct.Struct("<BH")
_TENSOR_TAIL = struct.Struct("<BBBB")
_TAG_U32 = struct.Struct("<BI")
_TAG_I64 = struct.Struct("<Bq")
_TAG_F64 = struct.Struct("<Bd")
_TAG_U8 = struct.Struct("<BB")

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U64_MAX = (1 << 64) - 1

# ---------------------------------------------------------------------------------------------
# dtypes: an explicit, append-only code table (codes are never reused or renumbered)
# ---------------------------------------------------------------------------------------------

_DTYPE_TABLE = (
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
    (21, "float8_e8m0fnu"),
    (22, "float4_e2m1fn_x2"),
)


def _build_dtype_tables() -> tuple[dict[torch.dtype, int], dict[int, torch.dtype]]:
    to_code: dict[torch.dtype, int] = {}
    from_code: dict[int, torch.dtype] = {}
    for code, name in _DTYPE_TABLE:
        dt = getattr(torch, name, None)  # older torch builds lack some of the newer dtypes
        if isinstance(dt, torch.dtype):
            to_code[dt] = code
            from_code[code] = dt
    return to_code, from_code


_DTYPE_TO_CODE, _CODE_TO_DTYPE = _build_dtype_tables()
DTYPE_CODES: Mapping[torch.dtype, int] = MappingProxyType(_DTYPE_TO_CODE)


def _is_device_type(s: object) -> bool:
    return type(s) is str and 0 < len(s) <= _MAX_DEVICE_NAME and s.isascii() and s.isidentifier()


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


def _key_bytes(key: object) -> bytes:
    if type(key) is not str:
        raise TypeError(f"schema keys must be str, got {type(key).__name__} {key!r}")
    try:
        kb = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"key {key!r}: not valid utf-8 ({e.reason})") from None
    if len(kb) > 0xFFFF:
        raise ValueError(f"key {key[:40]!r}...: {len(kb)} utf-8 bytes, at most 65535 allowed")
    return kb


@dataclass(frozen=True)
class TensorField:
    """One tensor key of a schema: everything about it that stays fixed from hop to hop.

    ``sliced`` is the sender's TP all-gather decision for this key; it travels in the schema so
    the receiver never re-derives it (a re-derivation that disagrees corrupts the tensor).
    """

    key: str
    dtype: torch.dtype
    ndim: int
    device_type: str
    sliced: bool = False

    def __post_init__(self) -> None:
        _key_bytes(self.key)
        if self.dtype not in _DTYPE_TO_CODE:
            raise TypeError(f"key {self.key!r}: dtype {self.dtype} has no wire code")
        if type(self.ndim) is not int or not 0 <= self.ndim <= 255:
            raise ValueError(
                f"key {self.key!r}: ndim must be an int in [0, 255], got {self.ndim!r}"
            )
        if not _is_device_type(self.device_type):
            raise ValueError(
                f"key {self.key!r}: device type {self.device_type!r} is not an ascii identifier "
                f"of at most {_MAX_DEVICE_NAME} characters"
            )
        if type(self.sliced) is not bool:
            raise TypeError(f"key {self.key!r}: sliced must be a bool, got {self.sliced!r}")


@dataclass(frozen=True)
class PlainField:
    """One non-tensor key of a schema; its value travels encoded in every header."""

    key: str

    def __post_init__(self) -> None:
        _key_bytes(self.key)


# Schemas built in this process, by id: lets encode_header validate shapes and name keys in its
# errors when the header omits the schema (the peer already has it). Weak: never keeps one alive.
_LOCAL_SCHEMAS: weakref.WeakValueDictionary[int, Schema] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Schema:
    """The fixed part of a tensor dict: its keys in order, and dtype/ndim/device per tensor key.

    Sent to a peer once and then referred to by :meth:`schema_id`, so a steady-state header
    only carries what changes from hop to hop (shapes, plain values, payload sizes).
    Construction validates every field and precomputes what the hot path needs.
    """

    fields: tuple[TensorField | PlainField, ...]

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        object.__setattr__(self, "fields", fields)
        seen: set[str] = set()
        parts = [_U32.pack(len(fields))]
        for f in fields:
            tf = type(f)
            if tf is not TensorField and tf is not PlainField:
                raise TypeError(f"schema fields must be TensorField or PlainField, got {f!r}")
            if f.key in seen:
                raise ValueError(f"key {f.key!r} appears twice in the schema")
            seen.add(f.key)
            kb = _key_bytes(f.key)
            if tf is TensorField:
                db = f.device_type.encode("ascii")
                parts.append(_KEY_HEAD.pack(1, len(kb)))
                parts.append(kb)
                parts.append(
                    _TENSOR_TAIL.pack(_DTYPE_TO_CODE[f.dtype], f.ndim, int(f.sliced), len(db))
                )
                parts.append(db)
            else:
                parts.append(_KEY_HEAD.pack(0, len(kb)))
                parts.append(kb)
        encoded = b"".join(parts)
        sid = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")
        tensors = tuple(f for f in fields if type(f) is TensorField)
        plains = tuple(f for f in fields if type(f) is PlainField)
        spans = []
        start = 0
        for f in tensors:
            spans.append((start, start + f.ndim))
            start += f.ndim
        setattr_ = object.__setattr__
        setattr_(self, "_encoded", encoded)
        setattr_(self, "_id", sid)
        setattr_(self, "_tensors", tensors)
        setattr_(self, "_plains", plains)
        setattr_(self, "_spans", tuple(spans))
        setattr_(self, "_shape_struct", struct.Struct(f"<{start}q"))
        # per tensor: (key, itemsize, device_type), for the receiver's size checks
        setattr_(self, "_tinfo", tuple((f.key, f.dtype.itemsize, f.device_type) for f in tensors))
        groups: dict[str, list[tuple[int, int]]] = {}
        for i, f in enumerate(tensors):
            groups.setdefault(f.device_type, []).append((i, f.dtype.itemsize))
        setattr_(self, "_dev_groups", tuple((d, tuple(m)) for d, m in groups.items()))
        _LOCAL_SCHEMAS[sid] = self

    def schema_id(self) -> int:
        """Stable 64-bit id: blake2b (8-byte digest, little-endian) of :func:`encode_schema`."""
        return self._id  # type: ignore[attr-defined]

    def tensor_fields(self) -> tuple[TensorField, ...]:
        """The tensor keys, in dict order; ``Header.shapes`` follows this order."""
        return self._tensors  # type: ignore[attr-defined]

    def plain_fields(self) -> tuple[PlainField, ...]:
        """The non-tensor keys, in dict order; ``Header.values`` follows this order."""
        return self._plains  # type: ignore[attr-defined]

    def keys(self) -> tuple[str, ...]:
        """All keys in dict order."""
        return tuple(f.key for f in self.fields)

    @classmethod
    def from_dict(cls, tensor_dict: Mapping[str, Any], *, sliced: Iterable[str] = ()) -> Schema:
        """The schema of a tensor dict; ``sliced`` names the keys the sender all-gathers."""
        sl = frozenset(sliced)
        fields: list[TensorField | PlainField] = []
        for k, v in tensor_dict.items():
            if isinstance(v, torch.Tensor):
                fields.append(TensorField(k, v.dtype, v.dim(), v.device.type, k in sl))
            else:
                fields.append(PlainField(k))
        return cls(tuple(fields))


def encode_schema(schema: Schema) -> bytes:
    """The canonical bytes of ``schema`` (computed once, at construction)."""
    return schema._encoded  # type: ignore[attr-defined]


def _max_schema_bytes(limits: Limits) -> int:
    return 4 + limits.max_entries * (3 + limits.max_key_bytes + 4 + _MAX_DEVICE_NAME)


def _parse_schema(buf: bytes, limits: Limits) -> Schema:
    end = len(buf)
    if end < 4:
        raise WireError(f"schema: {end} bytes, too short for its field count")
    (count,) = _U32.unpack_from(buf, 0)
    if count > limits.max_entries:
        raise WireError(f"schema: {count} fields, more than max_entries={limits.max_entries}")
    if count * 3 > end - 4:
        raise WireError(f"schema: {count} fields cannot fit in {end} bytes")
    pos = 4
    fields: list[TensorField | PlainField] = []
    seen: set[str] = set()
    for i in range(count):
        if pos + 3 > end:
            raise WireError(f"schema: truncated at field {i}")
        kind, klen = _KEY_HEAD.unpack_from(buf, pos)
        pos += 3
        if kind > 1:
            raise WireError(f"schema: field {i} has unknown kind {kind}")
        if klen > limits.max_key_bytes:
            raise WireError(
                f"schema: field {i} key of {klen} bytes, more than max_key_bytes="
                f"{limits.max_key_bytes}"
            )
        if pos + klen > end:
            raise WireError(f"schema: truncated in the key of field {i}")
        try:
            key = buf[pos : pos + klen].decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"schema: key of field {i} is not valid utf-8") from None
        pos += klen
        if key in seen:
            raise WireError(f"schema: key {key!r} appears twice")
        seen.add(key)
        if kind == 0:
            fields.append(PlainField(key))
            continue
        if pos + 4 > end:
            raise WireError(f"schema: truncated in tensor field {key!r}")
        code, ndim, fl, dlen = _TENSOR_TAIL.unpack_from(buf, pos)
        pos += 4
        dtype = _CODE_TO_DTYPE.get(code)
        if dtype is None:
            raise WireError(f"schema: key {key!r} has unknown dtype code {code}")
        if ndim > limits.max_ndim:
            raise WireError(
                f"schema: key {key!r} has ndim {ndim}, more than max_ndim={limits.max_ndim}"
            )
        if fl > 1:
            raise WireError(f"schema: key {key!r} has unknown tensor flags {fl:#x}")
        if not 0 < dlen <= _MAX_DEVICE_NAME or pos + dlen > end:
            raise WireError(f"schema: key {key!r} has a bad device type length {dlen}")
        dev = buf[pos : pos + dlen].decode("latin-1")
        pos += dlen
        if not _is_device_type(dev):
            raise WireError(f"schema: key {key!r} has an invalid device type {dev!r}")
        fields.append(TensorField(key, dtype, ndim, dev, fl == 1))
    if pos != end:
        raise WireError(f"schema: {end - pos} trailing bytes after {count} fields")
    schema = Schema(tuple(fields))
    if schema._encoded != buf:  # type: ignore[attr-defined]
        raise WireError("schema: non-canonical encoding")
    return schema


def decode_schema(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Schema:
    """Parse and validate schema bytes from a peer; raises :class:`WireError` on any defect."""
    nbytes = memoryview(data).nbytes
    if nbytes > _max_schema_bytes(limits):
        raise WireError(f"schema: {nbytes} bytes, more than the limits allow")
    buf = bytes(data)
    try:
        return _parse_schema(buf, limits)
    except WireError:
        raise
    except (struct.error, ValueError, TypeError, IndexError) as e:  # pragma: no cover - safety net
        raise WireError(f"schema: malformed ({e})") from None


def cache_schema(
    cache: dict[int, Schema], schema: Schema, capacity: int = SCHEMA_CACHE_SIZE
) -> None:
    """Insert ``schema`` as the newest entry of a bounded FIFO cache, evicting the oldest.

    :func:`decode_header` calls this for every schema a peer sends. The sender should keep a
    per-peer dict updated with this same function whenever it sends a schema, and send the
    schema again whenever its id is not in that dict: the two dicts then stay identical.
    """
    sid = schema.schema_id()
    cache.pop(sid, None)
    cache[sid] = schema
    while len(cache) > capacity:
        del cache[next(iter(cache))]


# ---------------------------------------------------------------------------------------------
# Plain values
# ---------------------------------------------------------------------------------------------

_T_NONE = 1
_T_FALSE = 2
_T_TRUE = 3
_T_INT = 4
_T_BIGINT = 5
_T_FLOAT = 6
_T_STR = 7
_T_BYTES = 8
_T_LIST = 9
_T_TUPLE = 10
_T_DICT = 11
_T_DTYPE = 12
_T_SIZE = 13
_T_PICKLE = 14

_B_NONE = bytes([_T_NONE])
_B_FALSE = bytes([_T_FALSE])
_B_TRUE = bytes([_T_TRUE])


class _EncodeFailure(Exception):
    """Internal: carries the failing value's path out of the recursion, for the message."""

    def __init__(self, kind: str, value: object, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.value = value
        self.detail = detail
        self.path: list[str] = []


def _enc(v: Any, out: list[bytes], depth: int, allow_pickle: bool, max_depth: int) -> None:
    t = type(v)
    if t is int:
        if _I64_MIN <= v <= _I64_MAX:
            out.append(_TAG_I64.pack(_T_INT, v))
        else:
            b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            out.append(_TAG_U32.pack(_T_BIGINT, len(b)))
            out.append(b)
    elif t is str:
        b = v.encode("utf-8", "surrogatepass")
        out.append(_TAG_U32.pack(_T_STR, len(b)))
        out.append(b)
    elif t is float:
        out.append(_TAG_F64.pack(_T_FLOAT, v))
    elif v is None:
        out.append(_B_NONE)
    elif t is bool:
        out.append(_B_TRUE if v else _B_FALSE)
    elif t is list or t is tuple:
        if depth >= max_depth:
            raise _EncodeFailure("depth", v)
        out.append(_TAG_U32.pack(_T_LIST if t is list else _T_TUPLE, len(v)))
        i = 0
        try:
            for i, x in enumerate(v):  # noqa: B007 - i is read in the handler
                # scalars inline: lists of token ids / Nones are the common case
                if x is None:
                    out.append(_B_NONE)
                elif type(x) is int and _I64_MIN <= x <= _I64_MAX:
                    out.append(_TAG_I64.pack(_T_INT, x))
                elif type(x) is float:
                    out.append(_TAG_F64.pack(_T_FLOAT, x))
                else:
                    _enc(x, out, depth + 1, allow_pickle, max_depth)
        except _EncodeFailure as e:
            e.path.append(f"[{i}]")
            raise
    elif t is dict:
        if depth >= max_depth:
            raise _EncodeFailure("depth", v)
        out.append(_TAG_U32.pack(_T_DICT, len(v)))
        k: Any = None
        try:
            for k, x in v.items():  # noqa: B007 - k is read in the handler
                _enc(k, out, depth + 1, allow_pickle, max_depth)
                _enc(x, out, depth + 1, allow_pickle, max_depth)
        except _EncodeFailure as e:
            e.path.append(f"[{k!r}]")
            raise
    elif t is bytes or t is bytearray:
        out.append(_TAG_U32.pack(_T_BYTES, len(v)))
        out.append(bytes(v))
    elif t is torch.dtype and v in _DTYPE_TO_CODE:
        out.append(_TAG_U8.pack(_T_DTYPE, _DTYPE_TO_CODE[v]))
    elif t is torch.Size:
        try:
            out.append(_TAG_U32.pack(_T_SIZE, len(v)) + struct.pack(f"<{len(v)}q", *v))
        except struct.error:
            raise _EncodeFailure("size", v) from None
    elif allow_pickle:
        try:
            b = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise _EncodeFailure("pickle", v, f"{type(e).__name__}: {e}") from None
        out.append(_TAG_U32.pack(_T_PICKLE, len(b)))
        out.append(b)
    else:
        raise _EncodeFailure("type", v)


def _encode_failure_message(e: _EncodeFailure, key: str, max_depth: int) -> BaseException:
    where = key + "".join(reversed(e.path))
    at = f" (at {where})" if e.path else ""
    tname = type(e.value).__qualname__
    if e.kind == "depth":
        return ValueError(
            f"key {key!r}: value nests lists/tuples/dicts deeper than max_depth={max_depth}{at}"
        )
    if e.kind == "size":
        return ValueError(f"key {key!r}: torch.Size with a dimension outside int64{at}")
    if e.kind == "pickle":
        return TypeError(f"key {key!r}: value of type {tname}{at} failed to pickle: {e.detail}")
    if isinstance(e.value, torch.Tensor) and not e.path:
        return TypeError(
            f"key {key!r}: a torch.Tensor is not a plain value; tensors travel in the payload "
            f"as the schema's TensorFields (or pass allow_pickle=True to send it pickled)"
        )
    if isinstance(e.value, torch.Tensor):
        return TypeError(
            f"key {key!r}: a torch.Tensor{at} nested inside a list/tuple/dict cannot travel in "
            f"the payload (only top-level tensors do); make it a top-level key, or pass "
            f"allow_pickle=True to send it pickled"
        )
    return TypeError(
        f"key {key!r}: value of type {tname}{at} is not encodable without pickle; "
        f"pass allow_pickle=True to send it"
    )


def _count_items(value: Any) -> int:
    """Container items in a plain value, counted the way the decoder counts them."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is list or t is tuple:
            total += len(v)
            stack.extend(x for x in v if type(x) in (list, tuple, dict))
        elif t is dict:
            total += 2 * len(v)
            stack.extend(x for kv in v.items() for x in kv if type(x) in (list, tuple, dict))
    return total


def _encode_into(
    out: list[bytes], value: Any, key: str, allow_pickle: bool, limits: Limits
) -> None:
    try:
        _enc(value, out, 0, allow_pickle, limits.max_depth)
    except _EncodeFailure as e:
        raise _encode_failure_message(e, key, limits.max_depth) from None
    except RecursionError:
        raise ValueError(f"key {key!r}: value nests too deeply to encode") from None
    except struct.error:  # a length that does not fit its u32 field (>= 4 GiB)
        raise ValueError(f"key {key!r}: value has a part too large to encode") from None


def encode_value(
    value: Any, *, allow_pickle: bool = False, key: str = "?", limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Encode one plain value (see the module docstring for the supported types).

    Raises ``TypeError`` naming ``key`` for a value that needs pickle when ``allow_pickle`` is
    False, and ``ValueError`` naming ``key`` when the value breaks ``limits`` (depth, size), so
    bad input fails on the sender, before anything is sent.
    """
    out: list[bytes] = []
    _encode_into(out, value, key, allow_pickle, limits)
    data = b"".join(out)
    if len(data) > limits.max_plain_bytes:
        raise ValueError(
            f"key {key!r}: value encodes to {len(data)} bytes, more than "
            f"max_plain_bytes={limits.max_plain_bytes}"
        )
    return data


def _dec(buf: bytes, pos: int, depth: int, st: list[int]) -> tuple[Any, int]:
    """Decode one value at ``pos``; ``st`` is [items left, max depth, allow_pickle]."""
    tag = buf[pos]
    pos += 1
    if tag == _T_INT:
        return _I64.unpack_from(buf, pos)[0], pos + 8
    if tag == _T_STR or tag == _T_BYTES or tag == _T_BIGINT or tag == _T_PICKLE:
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        end = pos + n
        if end > len(buf):
            raise WireError(f"value: length {n} at offset {pos - 5} runs past the end")
        if tag == _T_STR:
            try:
                return buf[pos:end].decode("utf-8", "surrogatepass"), end
            except UnicodeDecodeError:
                raise WireError(f"value: str at offset {pos - 5} is not valid utf-8") from None
        if tag == _T_BYTES:
            return buf[pos:end], end
        if tag == _T_BIGINT:
            return int.from_bytes(buf[pos:end], "little", signed=True), end
        if not st[2]:
            raise WireError("peer sent a pickled value but allow_pickle is False")
        try:
            return pickle.loads(buf[pos:end]), end
        except Exception as e:
            raise WireError(f"value: peer's pickled value failed to unpickle: {e!r}") from None
    if tag == _T_FLOAT:
        return _F64.unpack_from(buf, pos)[0], pos + 8
    if tag == _T_NONE:
        return None, pos
    if tag == _T_FALSE:
        return False, pos
    if tag == _T_TRUE:
        return True, pos
    if tag == _T_LIST or tag == _T_TUPLE or tag == _T_DICT:
        if depth >= st[1]:
            raise WireError(f"value: containers nested deeper than max_depth={st[1]}")
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        per = 2 if tag == _T_DICT else 1
        if n * per > len(buf) - pos:  # every item takes at least one byte
            raise WireError(f"value: container of {n} items cannot fit in the remaining bytes")
        st[0] -= n * per
        if st[0] < 0:
            raise WireError("value: more container items than max_items allows")
        depth += 1
        if tag == _T_DICT:
            d: dict[Any, Any] = {}
            for _ in range(n):
                k, pos = _dec(buf, pos, depth, st)
                x, pos = _dec(buf, pos, depth, st)
                try:
                    d[k] = x
                except TypeError:
                    raise WireError(
                        f"value: unhashable dict key of type {type(k).__name__}"
                    ) from None
            if len(d) != n:
                raise WireError("value: dict with duplicate keys")
            return d, pos
        items = []
        for _ in range(n):
            t2 = buf[pos]  # scalars inline, as on the encode side
            if t2 == _T_NONE:
                items.append(None)
                pos += 1
            elif t2 == _T_INT and pos + 9 <= len(buf):
                items.append(_I64.unpack_from(buf, pos + 1)[0])
                pos += 9
            else:
                x, pos = _dec(buf, pos, depth, st)
                items.append(x)
        return (items if tag == _T_LIST else tuple(items)), pos
    if tag == _T_DTYPE:
        code = buf[pos]
        dt = _CODE_TO_DTYPE.get(code)
        if dt is None:
            raise WireError(f"value: unknown dtype code {code}")
        return dt, pos + 1
    if tag == _T_SIZE:
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        if n * 8 > len(buf) - pos:
            raise WireError(f"value: torch.Size of {n} dims cannot fit in the remaining bytes")
        st[0] -= n
        if st[0] < 0:
            raise WireError("value: more container items than max_items allows")
        dims = struct.unpack_from(f"<{n}q", buf, pos)
        return torch.Size(dims), pos + 8 * n
    raise WireError(f"value: unknown tag {tag} at offset {pos - 1}")


_DECODE_ERRORS = (struct.error, IndexError, UnicodeDecodeError, OverflowError, TypeError)


def decode_value(
    data: bytes | bytearray | memoryview,
    *,
    allow_pickle: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Decode one plain value from a peer; the bytes must hold exactly one value.

    Raises :class:`WireError` on any defect, including a pickled value when ``allow_pickle``
    is False (a peer's bytes must not be able to run code here).
    """
    nbytes = memoryview(data).nbytes
    if nbytes > limits.max_plain_bytes:
        raise WireError(
            f"value: {nbytes} bytes, more than max_plain_bytes={limits.max_plain_bytes}"
        )
    buf = bytes(data)
    st = [limits.max_items, limits.max_depth, bool(allow_pickle)]
    try:
        value, pos = _dec(buf, 0, 0, st)
    except WireError:
        raise
    except RecursionError:
        raise WireError("value: nested too deeply") from None
    except _DECODE_ERRORS as e:
        raise WireError(f"value: truncated or malformed ({e})") from None
    if pos != len(buf):
        raise WireError(f"value: {len(buf) - pos} trailing bytes")
    return value


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """Everything the receiver needs before it posts the payload irecvs.

    On decode, ``schema`` is always the resolved schema (sent in this header or found in the
    cache), whatever the sender put there. ``payload_nbytes`` maps a device type to the exact
    byte size of that payload message; checking it against the layout the shapes imply is the
    transport's job (it owns the alignment rules). ``inline`` is a small CPU payload carried in
    the header itself (what it holds is the transport's business).
    """

    schema_id: int
    schema: Schema | None
    shapes: tuple[tuple[int, ...], ...]
    values: tuple[Any, ...]
    payload_nbytes: dict[str, int]
    inline: bytes | None = None
    seq: int = 0
    fingerprint: int = 0


def max_overflow_nbytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """The largest overflow length a receiver with ``limits`` accepts: a bound on every body."""
    return (
        4
        + _max_schema_bytes(limits)
        + 8 * limits.max_entries * limits.max_ndim
        + 1
        + MAX_DEVICE_TYPES * (2 + _MAX_DEVICE_NAME + 8)
        + 4
        + 2 * limits.max_plain_bytes  # inline bytes and plain values
    )


_ZEROS: dict[int, bytes] = {}
_SHAPE_STRUCTS: dict[int, struct.Struct] = {}
_DEV_BYTES: dict[str, bytes] = {}
_DEV_NAMES: dict[bytes, str] = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZEROS) < 256:  # bounded; a steady run uses a handful of padding sizes
            _ZEROS[n] = z
    return z


def _shape_struct(n: int) -> struct.Struct:
    s = _SHAPE_STRUCTS.get(n)
    if s is None:
        s = struct.Struct(f"<{n}q")
        if n <= 4096:
            _SHAPE_STRUCTS[n] = s
    return s


def _dev_entry_head(dev: str) -> bytes:
    b = _DEV_BYTES.get(dev)
    if b is None:
        if not _is_device_type(dev):
            raise ValueError(
                f"payload device type {dev!r} is not an ascii identifier of at most "
                f"{_MAX_DEVICE_NAME} characters"
            )
        b = _U8.pack(len(dev)) + dev.encode("ascii")
        if len(_DEV_BYTES) < 64:
            _DEV_BYTES[dev] = b
    return b


def _check_u64(name: str, v: object) -> None:
    if type(v) is not int or not 0 <= v <= _U64_MAX:
        raise ValueError(f"header {name} must be an int in [0, 2**64), got {v!r}")


def encode_header(
    header: Header,
    *,
    slot_bytes: int,
    allow_pickle: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[bytes, bytes | None]:
    """Encode ``header`` into one slot of exactly ``slot_bytes`` bytes, plus an overflow.

    Returns ``(slot, overflow)``: ``overflow`` is None when everything fits in the slot, else
    the bytes of the one extra message whose exact length the slot announces. Bad input (shape
    rank that disagrees with the schema, negative dims, unencodable plain values, values over
    ``limits``) raises ``TypeError``/``ValueError`` naming the key, before anything is sent.
    When ``header.schema`` is None (the peer has it already) the schema is looked up among the
    schemas alive in this process to validate shapes and name keys; it is never required.
    """
    if type(slot_bytes) is not int or not MIN_SLOT_BYTES <= slot_bytes <= 0xFFFFFFFF:
        raise ValueError(
            f"slot_bytes must be an int in [{MIN_SLOT_BYTES}, 2**32), got {slot_bytes!r}"
        )
    _check_u64("seq", header.seq)
    _check_u64("fingerprint", header.fingerprint)
    _check_u64("schema_id", header.schema_id)
    schema = header.schema
    parts: list[bytes] = []
    flags = 0
    if schema is not None:
        if header.schema_id != schema.schema_id():
            raise ValueError(
                f"header schema_id {header.schema_id:#x} does not match its schema "
                f"({schema.schema_id():#x})"
            )
        sb = schema._encoded  # type: ignore[attr-defined]
        parts.append(_U32.pack(len(sb)))
        parts.append(sb)
        flags = _F_SCHEMA
        known: Schema | None = schema
    else:
        known = _LOCAL_SCHEMAS.get(header.schema_id)

    # shapes
    shapes = header.shapes
    if known is not None:
        tfields = known._tensors  # type: ignore[attr-defined]
        if len(shapes) != len(tfields):
            raise ValueError(
                f"header has {len(shapes)} shapes but the schema has {len(tfields)} tensor keys"
            )
        for f, s in zip(tfields, shapes):
            if len(s) != f.ndim:
                raise ValueError(
                    f"key {f.key!r}: shape {tuple(s)} has rank {len(s)}, schema says {f.ndim}"
                )
    dims = [d for s in shapes for d in s]
    try:
        parts.append(_shape_struct(len(dims)).pack(*dims))
    except struct.error:
        dims_ok = False
    else:
        dims_ok = not dims or min(dims) >= 0
    if not dims_ok:
        for i, s in enumerate(shapes):
            if any(
                type(d) is not int and not hasattr(d, "__index__") or d < 0 or d > _I64_MAX
                for d in s
            ):
                name = repr(tfields[i].key) if known is not None else f"#{i}"
                raise ValueError(f"key {name}: shape {tuple(s)} must be non-negative int64 dims")
        raise ValueError(f"header shapes {shapes!r} must be non-negative int64 dims")

    # payload sizes
    pn = header.payload_nbytes
    if len(pn) > MAX_DEVICE_TYPES:
        raise ValueError(f"at most {MAX_DEVICE_TYPES} payload device types, got {len(pn)}")
    parts.append(_U8.pack(len(pn)))
    for dev, n in pn.items():
        if type(dev) is not str:
            raise ValueError(f"payload device type must be a str, got {dev!r}")
        parts.append(_dev_entry_head(dev))
        if type(n) is not int or not 0 <= n <= _U64_MAX:
            raise ValueError(f"payload_nbytes[{dev!r}] must be an int in [0, 2**64), got {n!r}")
        parts.append(_U64.pack(n))

    # inline
    inline = header.inline
    if inline is not None:
        inline = bytes(inline)
        if len(inline) > limits.max_plain_bytes:
            raise ValueError(
                f"inline payload of {len(inline)} bytes, more than "
                f"max_plain_bytes={limits.max_plain_bytes}"
            )
        parts.append(_U32.pack(len(inline)))
        parts.append(inline)
        flags |= _F_INLINE

    # plain values
    values = header.values
    if known is not None:
        pfields = known._plains  # type: ignore[attr-defined]
        if len(values) != len(pfields):
            raise ValueError(
                f"header has {len(values)} values but the schema has {len(pfields)} plain keys"
            )
        keys = [f.key for f in pfields]
    else:
        keys = [f"#{i}" for i in range(len(values))]
    nfixed = len(parts)
    for key, v in zip(keys, values):
        _encode_into(parts, v, key, allow_pickle, limits)
    vbytes = sum(map(len, parts[nfixed:]))
    if vbytes > limits.max_plain_bytes:
        raise ValueError(
            f"plain values encode to {vbytes} bytes, more than "
            f"max_plain_bytes={limits.max_plain_bytes}"
        )
    if vbytes > limits.max_items:  # every item takes a byte: only then can there be too many
        items = 0
        for key, v in zip(keys, values):
            items += _count_items(v)
            if items > limits.max_items:
                raise ValueError(
                    f"key {key!r}: plain values hold more than max_items={limits.max_items} "
                    "container items in all, more than the peer accepts"
                )

    body_total = sum(map(len, parts))
    cap = slot_bytes - PREFIX_BYTES
    if body_total <= cap:
        prefix = _PREFIX.pack(
            MAGIC,
            VERSION,
            flags,
            0,
            slot_bytes,
            body_total,
            header.seq,
            header.schema_id,
            header.fingerprint,
            0,
        )
        parts.insert(0, prefix)
        if body_total < cap:
            parts.append(_zeros(cap - body_total))
        return b"".join(parts), None
    ovl = body_total - cap
    prefix = _PREFIX.pack(
        MAGIC,
        VERSION,
        flags | _F_OVERFLOW,
        0,
        slot_bytes,
        cap,
        header.seq,
        header.schema_id,
        header.fingerprint,
        ovl,
    )
    body = b"".join(parts)
    return prefix + body[:cap], body[cap:]


def _as_bytes(data: Any) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or data.dtype != torch.uint8:
            raise WireError(
                f"header buffer must be a CPU uint8 tensor, got {data.dtype} on {data.device}"
            )
        return data.contiguous().numpy().tobytes()
    return bytes(data)


def _parse_prefix(
    slot: bytes, slot_bytes: int, limits: Limits
) -> tuple[int, int, int, int, int, int]:
    if len(slot) != slot_bytes:
        raise WireError(f"header slot is {len(slot)} bytes, expected exactly {slot_bytes}")
    if slot_bytes < MIN_SLOT_BYTES:
        raise WireError(f"slot_bytes {slot_bytes} is below the minimum {MIN_SLOT_BYTES}")
    magic, version, flags, reserved, peer_slot, body_len, seq, sid, fp, ovl = _PREFIX.unpack_from(
        slot, 0
    )
    if magic != MAGIC:
        raise WireError(f"bad header magic {magic!r} (expected {MAGIC!r}): not a pipepack header")
    if version != VERSION:
        raise WireError(f"header version {version}, this build speaks version {VERSION}")
    if flags & ~_F_ALL:
        raise WireError(f"header has unknown flags {flags:#x}")
    if reserved:
        raise WireError(f"header reserved field is {reserved:#x}, expected 0")
    if peer_slot != slot_bytes:
        raise WireError(f"peer uses slot_bytes={peer_slot}, this side {slot_bytes}")
    cap = slot_bytes - PREFIX_BYTES
    if body_len > cap:
        raise WireError(f"header body length {body_len} exceeds the slot's {cap} bytes")
    if flags & _F_OVERFLOW:
        if body_len != cap:
            raise WireError("header announces an overflow but does not fill its slot")
        if ovl == 0:
            raise WireError("header announces an overflow of 0 bytes")
        if ovl > max_overflow_nbytes(limits):
            raise WireError(
                f"header announces an overflow of {ovl} bytes, more than the limits allow "
                f"({max_overflow_nbytes(limits)})"
            )
    elif ovl:
        raise WireError(f"header has overflow length {ovl} without the overflow flag")
    return flags, body_len, seq, sid, fp, ovl


def overflow_nbytes(slot: Any, *, slot_bytes: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """The exact, validated length of the overflow message that follows ``slot`` (0 if none)."""
    slot = _as_bytes(slot)
    try:
        return _parse_prefix(slot, slot_bytes, limits)[5]
    except struct.error as e:  # pragma: no cover - length is checked first
        raise WireError(f"header: malformed prefix ({e})") from None


def decode_header(
    slot: Any,
    overflow: Any = None,
    *,
    slot_bytes: int,
    limits: Limits = DEFAULT_LIMITS,
    allow_pickle: bool = False,
    schema_cache: dict[int, Schema] | None = None,
) -> tuple[Header | None, int]:
    """Decode a header slot (and its overflow message, when there is one).

    Returns ``(header, overflow_len)``. When the slot announces an overflow and ``overflow``
    is None, returns ``(None, overflow_len)`` without parsing the body: the caller receives
    exactly ``overflow_len`` bytes and calls again with them. ``overflow_len`` is validated
    against ``limits`` before it is returned, so it is safe to allocate.

    A schema carried in the header is checked against its id and stored in ``schema_cache``
    (bounded, see :func:`cache_schema`); without one, the id must be in ``schema_cache``.
    The cache is only updated once the whole header decoded cleanly. Any defect in the bytes
    raises :class:`WireError`.
    """
    slot = _as_bytes(slot)
    flags, body_len, seq, sid, fp, ovl = _parse_prefix(slot, slot_bytes, limits)
    end = PREFIX_BYTES + body_len
    if ovl:
        if overflow is None:
            return None, ovl
        overflow = _as_bytes(overflow)
        if len(overflow) != ovl:
            raise WireError(f"overflow is {len(overflow)} bytes, the header announced {ovl}")
        body = slot[PREFIX_BYTES:] + overflow
    else:
        if overflow is not None and len(overflow):
            raise WireError("an overflow was given but the header announces none")
        if slot[end:] != _zeros(slot_bytes - end):
            raise WireError("header slot has non-zero bytes after its body")
        body = slot[PREFIX_BYTES:end]
    try:
        return _parse_body(body, flags, seq, sid, fp, limits, allow_pickle, schema_cache), ovl
    except WireError:
        raise
    except RecursionError:
        raise WireError("header: plain values nested too deeply") from None
    except _DECODE_ERRORS as e:
        raise WireError(f"header: truncated or malformed body ({e})") from None


def _parse_body(
    body: bytes,
    flags: int,
    seq: int,
    sid: int,
    fp: int,
    limits: Limits,
    allow_pickle: bool,
    schema_cache: dict[int, Schema] | None,
) -> Header:
    pos = 0
    new_schema = False
    if flags & _F_SCHEMA:
        (n,) = _U32.unpack_from(body, 0)
        pos = 4 + n
        if pos > len(body):
            raise WireError(f"header: schema of {n} bytes runs past the end of the body")
        sb = body[4:pos]
        got = int.from_bytes(hashlib.blake2b(sb, digest_size=8).digest(), "little")
        if got != sid:
            raise WireError(f"header: schema bytes hash to {got:#x}, header says {sid:#x}")
        schema = schema_cache.get(sid) if schema_cache is not None else None
        if schema is None:
            schema = decode_schema(sb, limits)
        new_schema = True
    else:
        schema = schema_cache.get(sid) if schema_cache is not None else None
        if schema is None:
            raise WireError(
                f"unknown schema id {sid:#x}: the peer did not send it, or this side evicted it"
            )

    # shapes
    st = schema._shape_struct  # type: ignore[attr-defined]
    dims = st.unpack_from(body, pos)
    pos += st.size
    shapes = tuple([dims[a:b] for a, b in schema._spans])  # type: ignore[attr-defined]
    maxp = limits.max_payload_bytes
    if dims and min(dims) < 0:
        for (key, _, _), s in zip(schema._tinfo, shapes):  # type: ignore[attr-defined]
            if s and min(s) < 0:
                raise WireError(f"header: key {key!r} has a negative dim in shape {s}")
    # The total per device bounds every single tensor too (sizes are non-negative), so the
    # per-key search only runs once a total is over the limit.
    prod = math.prod
    for dev, members in schema._dev_groups:  # type: ignore[attr-defined]
        total = 0
        for i, itemsize in members:
            total += prod(shapes[i]) * itemsize
        if total > maxp:
            for i, itemsize in members:
                nb = prod(shapes[i]) * itemsize
                if nb > maxp:
                    raise WireError(
                        f"header: key {schema._tinfo[i][0]!r} shape {shapes[i]} is {nb} bytes, "  # type: ignore[attr-defined]
                        f"more than max_payload_bytes={maxp}"
                    )
            raise WireError(
                f"header: {dev} tensors total {total} bytes, more than max_payload_bytes={maxp}"
            )

    # payload sizes
    count = body[pos]
    pos += 1
    if count > MAX_DEVICE_TYPES:
        raise WireError(f"header: {count} payload device types, at most {MAX_DEVICE_TYPES}")
    payload_nbytes: dict[str, int] = {}
    for _ in range(count):
        dlen = body[pos]
        pos += 1
        if not 0 < dlen <= _MAX_DEVICE_NAME:
            raise WireError(f"header: payload device type name of {dlen} bytes")
        raw = body[pos : pos + dlen]
        pos += dlen
        dev = _DEV_NAMES.get(raw)
        if dev is None:
            dev = raw.decode("latin-1")
            if not _is_device_type(dev):
                raise WireError(f"header: invalid payload device type {dev!r}")
            if len(_DEV_NAMES) < 32:  # bounded: a peer cannot grow it
                _DEV_NAMES[raw] = dev
        if dev in payload_nbytes:
            raise WireError(f"header: payload device type {dev!r} listed twice")
        (n,) = _U64.unpack_from(body, pos)
        pos += 8
        if n > maxp:
            raise WireError(
                f"header: {dev} payload of {n} bytes, more than max_payload_bytes={maxp}"
            )
        payload_nbytes[dev] = n

    # inline
    inline = None
    if flags & _F_INLINE:
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        if n > limits.max_plain_bytes:
            raise WireError(
                f"header: inline payload of {n} bytes, more than "
                f"max_plain_bytes={limits.max_plain_bytes}"
            )
        if pos + n > len(body):
            raise WireError(f"header: inline payload of {n} bytes runs past the end of the body")
        inline = body[pos : pos + n]
        pos += n

    # plain values
    if len(body) - pos > limits.max_plain_bytes:
        raise WireError(
            f"header: {len(body) - pos} bytes of plain values, more than "
            f"max_plain_bytes={limits.max_plain_bytes}"
        )
    plains = schema._plains  # type: ignore[attr-defined]
    if plains:
        dst = [limits.max_items, limits.max_depth, bool(allow_pickle)]
        vals = []
        for f in plains:
            try:
                v, pos = _dec(body, pos, 0, dst)
            except WireError as e:
                raise WireError(f"header: key {f.key!r}: {e}") from None
            vals.append(v)
        values = tuple(vals)
    else:
        values = ()
    if pos != len(body):
        raise WireError(f"header: {len(body) - pos} trailing bytes after the plain values")

    if new_schema and schema_cache is not None:
        cache_schema(schema_cache, schema)
    # Bypasses the frozen dataclass __init__ (one object.__setattr__ per field, ~2 us): every
    # field was validated above, and this runs on every hop.
    h = object.__new__(Header)
    h.__dict__.update(
        schema_id=sid,
        schema=schema,
        shapes=shapes,
        values=values,
        payload_nbytes=payload_nbytes,
        inline=inline,
        seq=seq,
        fingerprint=fp,
    )
    return h
