"""Bounds on what a peer may make this process allocate, decode or receive."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS", "WireError"]


class WireError(ValueError):
    """Bytes received from a peer are malformed, inconsistent, or exceed this side's limits.

    A subclass of ``ValueError``: every problem found in a peer's bytes raises this one type.
    """


@dataclass(frozen=True)
class Limits:
    """Receiver-side bounds, checked on every value read from a peer before it is used.

    ``max_payload_bytes`` bounds each tensor's bytes and each payload a hop announces;
    ``max_header_bytes`` the encoded header (schema, shapes and plain values); ``max_entries``
    the keys plus tensors of one hop; ``max_items`` the container elements of all plain values
    of one hop (a byte of ``None`` would otherwise cost 8 bytes of pointers). The sender refuses
    a dict a peer with the same limits would refuse.
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
        if self.max_entries > 0xFFFF:
            raise ValueError("Limits.max_entries cannot exceed 65535 (u16 on the wire)")

    @property
    def max_header_bytes(self) -> int:
        """Largest header a hop may announce: schema, shapes and plain values together."""
        per_entry = 8 + self.max_key_bytes + 4 + 8 * self.max_ndim
        return 64 + self.max_entries * per_entry + self.max_plain_bytes


DEFAULT_LIMITS = Limits()
