from typing import Any

from pipepack.testing import check_dict, check_plain, check_tensor, raw_bytes  # noqa: F401


def decode_encoded(
    enc: Any,
    *,
    limits: Any = None,
    allow_pickle: bool = False,
    capacity: int = 1 << 30,
) -> dict[str, Any]:
    """What a link's receiver makes of an encoded hop, minus the transport: the payloads are
    packed into fresh buffers, the frame is encoded and decoded, and only those bytes are read."""
    import torch

    from pipepack.kernels import pack
    from pipepack.pp import codec
    from pipepack.pp.wire import (
        DEFAULT_LIMITS,
        F_INLINE,
        Frame,
        align16,
        decode_frame,
        encode_frame,
    )

    limits = DEFAULT_LIMITS if limits is None else limits
    payloads = {}
    for dev, p in enc.parts.items():
        if dev == "meta":
            continue
        buf = torch.zeros(p.wire_layout.nbytes, dtype=torch.uint8)
        pack(enc.sources[dev], out=buf, layout=p.wire_layout)
        payloads[dev] = buf
    cpu_n = payloads["cpu"].numel() if "cpu" in payloads else 0
    head_len = align16(64 + len(enc.body)) + cpu_n
    frame = Frame(enc.flags | F_INLINE, 0, head_len, len(enc.body), cpu_n, 0, None, enc.tp_world, 0)
    f = decode_frame(encode_frame(frame), capacity=capacity, limits=limits)
    dec = codec.header_parts(f, enc.body, limits)
    out, post = codec.decode(
        f, enc.body, dec, payloads, allow_pickle=allow_pickle, limits=limits, tp=None
    )
    assert post == []
    return out
