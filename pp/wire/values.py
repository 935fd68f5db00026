"""The tagged binary codec of plain values: no pickle unless both ends opt in.

One tag byte, then::

    1 None | 2 False | 3 True | 4 int64 (8 bytes) | 5 big int (only outside int64, in the
    fewest bytes): u32 n, n bytes signed LE
    6 float64 (8 bytes, exact bits) | 7 str: u32 n, utf-8 (surrogatepass) | 8 bytes: u32 n, n
    9 list: u32 count, items | 10 tuple: u32 count, items | 11 dict: u32 count, key, value...
    12 torch.dtype: u8 code | 13 torch.Size: u32 count, int64 each | 14 pickle: u32 n, n bytes
    15 tensor: u32 index into the hop's tensor table (its bytes travel in the payload)

Types are dispatched on the *exact* type, so nothing silently changes type on the way (``bool``
stays ``bool``, ``tuple`` stays ``tuple``); ``bytearray`` arrives as ``bytes``. Subclasses
(``IntEnum``, ``OrderedDict``, named tuples) and every other object need ``allow_pickle``.
A tensor nested in a list, tuple or dict is appended to the hop's tensor table by the encoder;
the decoder requires those references in increasing order, each exactly once.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import Any

import torch

from .dtypes import DTYPE_CODES, dtype_of_code
from .limits import WireError

__all__ = ["encode_value", "decode_value", "EncodeFailure", "encode_failure_message"]

T_NONE, T_FALSE, T_TRUE, T_INT, T_BIGINT, T_FLOAT, T_STR, T_BYTES = 1, 2, 3, 4, 5, 6, 7, 8
T_LIST, T_TUPLE, T_DICT, T_DTYPE, T_SIZE, T_PICKLE, T_TENSOR = 9, 10, 11, 12, 13, 14, 15

_B_NONE, _B_FALSE, _B_TRUE = bytes([T_NONE]), bytes([T_FALSE]), bytes([T_TRUE])
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_TAG_U32 = struct.Struct("<BI")
_TAG_I64 = struct.Struct("<Bq")
_TAG_F64 = struct.Struct("<Bd")
_TAG_U8 = struct.Struct("<BB")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class EncodeFailure(Exception):
    """Carries the failing value's path out of the recursion, for the message."""

    def __init__(self, kind: str, value: object, detail: str = "") -> None:
        super().__init__(kind)
        self.kind, self.value, self.detail = kind, value, detail
        self.path: list[str] = []


class _Enc:
    __slots__ = ("out", "tensors", "allow_pickle", "max_depth", "items", "pickled")

    def __init__(self, tensors: list[torch.Tensor], allow_pickle: bool, max_depth: int) -> None:
        self.out: list[bytes] = []
        self.tensors = tensors
        self.allow_pickle = allow_pickle
        self.max_depth = max_depth
        self.items = 0
        self.pickled = False

    def enc(self, v: Any, depth: int) -> None:
        out = self.out
        t = type(v)
        if t is int:
            if _I64_MIN <= v <= _I64_MAX:
                out.append(_TAG_I64.pack(T_INT, v))
            else:
                b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out.append(_TAG_U32.pack(T_BIGINT, len(b)))
                out.append(b)
        elif t is str:
            b = v.encode("utf-8", "surrogatepass")
            out.append(_TAG_U32.pack(T_STR, len(b)))
            out.append(b)
        elif t is float:
            out.append(_TAG_F64.pack(T_FLOAT, v))
        elif v is None:
            out.append(_B_NONE)
        elif t is bool:
            out.append(_B_TRUE if v else _B_FALSE)
        elif t is list or t is tuple:
            if depth >= self.max_depth:
                raise EncodeFailure("depth", v)
            out.append(_TAG_U32.pack(T_LIST if t is list else T_TUPLE, len(v)))
            self.items += len(v)
            i = 0
            try:
                for i, x in enumerate(v):  # noqa: B007 - i is read in the handler
                    tx = type(x)
                    if x is None:  # scalars inline: lists of token ids are the common case
                        out.append(_B_NONE)
                    elif tx is int and _I64_MIN <= x <= _I64_MAX:
                        out.append(_TAG_I64.pack(T_INT, x))
                    elif tx is float:
                        out.append(_TAG_F64.pack(T_FLOAT, x))
                    else:
                        self.enc(x, depth + 1)
            except EncodeFailure as e:
                e.path.append(f"[{i}]")
                raise
        elif t is dict:
            if depth >= self.max_depth:
                raise EncodeFailure("depth", v)
            out.append(_TAG_U32.pack(T_DICT, len(v)))
            self.items += 2 * len(v)
            k: Any = None
            try:
                for k, x in v.items():  # noqa: B007 - k is read in the handler
                    if isinstance(k, torch.Tensor):
                        raise EncodeFailure("tensor_key", k)
                    self.enc(k, depth + 1)
                    self.enc(x, depth + 1)
            except EncodeFailure as e:
                e.path.append(f"[{k!r}]")
                raise
        elif t is torch.Tensor or isinstance(v, torch.Tensor):
            if depth == 0:
                raise EncodeFailure("top_tensor", v)
            out.append(_TAG_U32.pack(T_TENSOR, len(self.tensors)))
            self.tensors.append(v)
        elif t is bytes or t is bytearray:
            out.append(_TAG_U32.pack(T_BYTES, len(v)))
            out.append(bytes(v))
        elif t is torch.dtype and v in DTYPE_CODES:
            out.append(_TAG_U8.pack(T_DTYPE, DTYPE_CODES[v]))
        elif t is torch.Size:
            try:
                out.append(_TAG_U32.pack(T_SIZE, len(v)) + struct.pack(f"<{len(v)}q", *v))
            except struct.error:
                raise EncodeFailure("size", v) from None
            self.items += len(v)
        elif self.allow_pickle:
            try:
                b = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                raise EncodeFailure("pickle", v, f"{type(e).__name__}: {e}") from None
            out.append(_TAG_U32.pack(T_PICKLE, len(b)))
            out.append(b)
            self.pickled = True
        else:
            raise EncodeFailure("type", v)


def encode_failure_message(e: EncodeFailure, key: str, max_depth: int) -> BaseException:
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
    if e.kind == "tensor_key":
        return TypeError(f"key {key!r}: a torch.Tensor used as a dict key{at} cannot travel")
    return TypeError(
        f"key {key!r}: value of type {tname}{at} is not encodable without pickle; "
        f"pass allow_pickle=True to send it"
    )


def encode_value(
    value: Any,
    tensors: list[torch.Tensor],
    *,
    key: str,
    allow_pickle: bool,
    max_depth: int,
) -> tuple[bytes, int, bool]:
    """Encodes one plain value; nested tensors are appended to ``tensors``.

    Returns ``(bytes, container items, pickled)``. Raises ``TypeError``/``ValueError`` naming
    ``key`` and the path inside the value for anything that cannot travel.
    """
    enc = _Enc(tensors, allow_pickle, max_depth)
    try:
        enc.enc(value, 1)  # depth 1: a tensor here is nested (top-level ones are fields)
    except EncodeFailure as e:
        raise encode_failure_message(e, key, max_depth) from None
    except RecursionError:
        raise ValueError(f"key {key!r}: value nests too deeply to encode") from None
    except struct.error:  # a length that does not fit its u32 field (>= 4 GiB)
        raise ValueError(f"key {key!r}: value has a part too large to encode") from None
    return b"".join(enc.out), enc.items, enc.pickled


class _Dec:
    __slots__ = ("buf", "items", "max_depth", "allow_pickle", "tensor", "next_tensor")

    def __init__(
        self,
        buf: bytes,
        items: int,
        max_depth: int,
        allow_pickle: bool,
        tensor: Callable[[int], torch.Tensor],
        first_tensor: int,
    ) -> None:
        self.buf = buf
        self.items = items
        self.max_depth = max_depth
        self.allow_pickle = allow_pickle
        self.tensor = tensor
        self.next_tensor = first_tensor

    def count(self, n: int) -> None:
        self.items -= n
        if self.items < 0:
            raise WireError("value: more container items than max_items allows")

    def dec(self, pos: int, depth: int) -> tuple[Any, int]:
        buf = self.buf
        tag = buf[pos]
        pos += 1
        if tag == T_INT:
            return _I64.unpack_from(buf, pos)[0], pos + 8
        if tag in (T_STR, T_BYTES, T_BIGINT, T_PICKLE):
            (n,) = _U32.unpack_from(buf, pos)
            pos += 4
            end = pos + n
            if end > len(buf):
                raise WireError(f"value: length {n} at offset {pos - 5} runs past the end")
            if tag == T_STR:
                try:
                    return buf[pos:end].decode("utf-8", "surrogatepass"), end
                except UnicodeDecodeError:
                    raise WireError(f"value: str at offset {pos - 5} is not valid utf-8") from None
            if tag == T_BYTES:
                return buf[pos:end], end
            if tag == T_BIGINT:
                v = int.from_bytes(buf[pos:end], "little", signed=True)
                if _I64_MIN <= v <= _I64_MAX or n != (v.bit_length() + 8) // 8:
                    raise WireError(
                        f"value: big int at offset {pos - 5} is not in its one "
                        "encoding (outside int64, minimal length)"
                    )
                return v, end
            if not self.allow_pickle:
                raise WireError("the peer sent a pickled value but allow_pickle is False here")
            try:
                return pickle.loads(buf[pos:end]), end
            except Exception as e:
                raise WireError(
                    f"value: the peer's pickled value failed to unpickle: {e!r}"
                ) from None
        if tag == T_FLOAT:
            return _F64.unpack_from(buf, pos)[0], pos + 8
        if tag == T_NONE:
            return None, pos
        if tag == T_FALSE:
            return False, pos
        if tag == T_TRUE:
            return True, pos
        if tag in (T_LIST, T_TUPLE, T_DICT):
            if depth >= self.max_depth:
                raise WireError(f"value: containers nested deeper than max_depth={self.max_depth}")
            (n,) = _U32.unpack_from(buf, pos)
            pos += 4
            per = 2 if tag == T_DICT else 1
            if n * per > len(buf) - pos:  # every item takes at least one byte
                raise WireError(f"value: container of {n} items cannot fit in the bytes left")
            self.count(n * per)
            depth += 1
            if tag == T_DICT:
                d: dict[Any, Any] = {}
                for _ in range(n):
                    k, pos = self.dec(pos, depth)
                    x, pos = self.dec(pos, depth)
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
            append = items.append
            for _ in range(n):
                t = buf[pos]  # the common scalars inline: lists of per-request values are long
                if t == T_NONE:
                    append(None)
                    pos += 1
                elif t == T_INT:
                    append(_I64.unpack_from(buf, pos + 1)[0])
                    pos += 9
                else:
                    x, pos = self.dec(pos, depth)
                    append(x)
            return (items if tag == T_LIST else tuple(items)), pos
        if tag == T_DTYPE:
            dt = dtype_of_code(buf[pos])
            if dt is None:
                raise WireError(f"value: unknown dtype code {buf[pos]}")
            return dt, pos + 1
        if tag == T_SIZE:
            (n,) = _U32.unpack_from(buf, pos)
            pos += 4
            if n * 8 > len(buf) - pos:
                raise WireError(f"value: torch.Size of {n} dims cannot fit in the bytes left")
            self.count(n)
            return torch.Size(struct.unpack_from(f"<{n}q", buf, pos)), pos + 8 * n
        if tag == T_TENSOR:
            (i,) = _U32.unpack_from(buf, pos)
            if i != self.next_tensor:
                raise WireError(f"value: tensor reference {i} where {self.next_tensor} was due")
            self.next_tensor += 1
            return self.tensor(i), pos + 4
        raise WireError(f"value: unknown tag {tag} at offset {pos - 1}")


_DECODE_ERRORS = (struct.error, IndexError, UnicodeDecodeError, OverflowError, TypeError)


def decode_value(
    buf: bytes,
    pos: int,
    *,
    items: int,
    max_depth: int,
    allow_pickle: bool,
    tensor: Callable[[int], torch.Tensor],
    first_tensor: int,
) -> tuple[Any, int, int, int]:
    """Decodes one value at ``pos``; returns ``(value, end, items left, next tensor index)``."""
    d = _Dec(buf, items, max_depth, allow_pickle, tensor, first_tensor)
    try:
        value, end = d.dec(pos, 1)
    except WireError:
        raise
    except RecursionError:
        raise WireError("value: nested too deeply") from None
    except _DECODE_ERRORS as e:
        raise WireError(f"value: truncated or malformed ({e})") from None
    return value, end, d.items, d.next_tensor
