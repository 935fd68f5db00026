"""A small decoder-only transformer, split by layers into pipeline stages, for tests and benches.

It is shaped like the models engines serve (RMSNorm, causal self-attention, SwiGLU MLP, the
vLLM-style fused ``add + RMSNorm`` that carries a ``residual`` stream), so a stage boundary
moves what real engines move: the ``{"hidden_states", "residual"}`` pair, both ``[T, hidden]``.

Bit-equality with "one process" needs the *same op sequence* on both sides: floating-point
results depend on which kernels run on which shapes. So the one-process reference
(:func:`reference_forward`) is not a separately written model: it builds the very stage modules
the pipeline runs and calls them in order in one process. The only thing the pipeline adds is
the transport between them, which is exactly what the comparison then tests.

Weights are drawn on the CPU in float32 from a ``torch.Generator`` seeded per layer and tensor
(no global RNG), then cast to the configured dtype and moved to the device, so every process
that builds a stage gets the same bytes whatever the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "ModelConfig",
    "build_stage",
    "stage_layers",
    "reference_forward",
    "sample_tokens",
    "boundary_example",
]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference model. ``seed`` fixes every weight."""

    vocab: int = 512
    hidden: int = 256
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    dtype: torch.dtype = torch.float32
    seed: int = 0
    eps: float = 1e-6
    # the first norm of every stage after the first as pipepack's fused receive op
    # (pipepack.kernels.add_rmsnorm_reference, "vllm" order); the receiving stage may then
    # take its input from PendingRecv.wait_add_rmsnorm and skip that norm
    fused_boundary_norm: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if min(self.vocab, self.hidden, self.heads, self.layers, self.mlp_ratio) < 1:
            raise ValueError(f"every size must be >= 1: {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def intermediate(self) -> int:
        return self.hidden * self.mlp_ratio


def _weight(
    config: ModelConfig, stream: int, shape: tuple[int, ...], std: float, device: torch.device | str
) -> nn.Parameter:
    """One weight tensor from its own generator: independent of the split and of load order."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + stream)
    w = torch.randn(shape, generator=g, dtype=torch.float32) * std
    return nn.Parameter(w.to(dtype=config.dtype, device=device), requires_grad=False)


def _ones(config: ModelConfig, n: int, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.ones(n, dtype=config.dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: statistics in float32; with ``residual`` it first adds it (fused form).

    ``fused``: the add + norm is pipepack's fused op instead (its fixed reduction order), the
    one a receiving stage can run on the hop's bytes.
    """

    def __init__(self, weight: nn.Parameter, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.fused = fused

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x), x
        if self.fused:
            from pipepack.kernels import add_rmsnorm_reference

            return add_rmsnorm_reference(x, residual, self.weight, self.eps, order="vllm")
        x = x + residual
        return self._norm(x), x


class Attention(nn.Module):
    """Causal self-attention over one micro-batch, treated as one sequence of ``T`` tokens."""

    def __init__(self, config: ModelConfig, layer: int, device: torch.device | str) -> None:
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        std = 1.0 / math.sqrt(h)
        self.qkv = _weight(config, 100 * layer + 1, (3 * h, h), std, device)
        self.out = _weight(config, 100 * layer + 2, (h, h), std, device)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.qkv)
        q, k, v = rearrange(qkv, "t (three h d) -> three h t d", three=3, h=self.heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        t = x.shape[0]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        ctx = rearrange(torch.matmul(probs, v), "h t d -> t (h d)")
        return F.linear(ctx, self.out)


class MLP(nn.Module):
    """SwiGLU: one fused gate/up projection, ``silu(gate) * up``, down projection."""

    def __init__(self, config: ModelConfig, layer: int, device: torch.device | str) -> None:
        super().__init__()
        h, i = config.hidden, config.intermediate
        self.gate_up = _weight(config, 100 * layer + 3, (2 * i, h), 1.0 / math.sqrt(h), device)
        self.down = _weight(config, 100 * layer + 4, (h, i), 1.0 / math.sqrt(i), device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class DecoderLayer(nn.Module):
    """Pre-norm block in vLLM's residual form: ``(h, residual) -> (h, residual)``."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        device: torch.device | str,
        fused_input_norm: bool = False,
    ) -> None:
        super().__init__()
        self.input_norm = RMSNorm(
            _ones(config, config.hidden, device), config.eps, fused=fused_input_norm
        )
        self.attn = Attention(config, layer, device)
        self.post_attn_norm = RMSNorm(_ones(config, config.hidden, device), config.eps)
        self.mlp = MLP(config, layer, device)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, *, normed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not normed:  # normed: the input norm already ran (on the receive path)
            h, residual = self.input_norm(h, residual)
        h = self.attn(h)
        h, residual = self.post_attn_norm(h, residual)
        return self.mlp(h), residual


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """The contiguous layer slice of ``stage``: as even as possible, earlier stages get extras."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in [0, {num_stages})")
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} stages need at least as many layers, got {num_layers}")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class PipelineStage(nn.Module):
    """One stage: a tensor dict in, a tensor dict out.

    Stage 0 takes ``{"input_ids": [T] int64}``; every boundary carries ``{"hidden_states",
    "residual"}``; the last stage returns ``{"logits": [T, vocab]}``. A single stage does it all.
    An input with ``"__normed__": True`` already went through the first layer's input norm
    (``PendingRecv.wait_add_rmsnorm`` with ``fused_boundary_norm``).
    """

    def __init__(
        self, config: ModelConfig, stage: int, num_stages: int, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.config = config
        self.first = stage == 0
        self.last = stage == num_stages - 1
        self.layer_ids = stage_layers(config.layers, stage, num_stages)
        h = config.hidden
        if self.first:
            self.embed = _weight(config, 1, (config.vocab, h), 1.0, device)
        fused = config.fused_boundary_norm and not self.first
        self.layers = nn.ModuleList(
            DecoderLayer(config, i + 1, device, fused_input_norm=fused and i == self.layer_ids[0])
            for i in self.layer_ids
        )
        if self.last:
            self.final_norm = RMSNorm(_ones(config, h, device), config.eps)
            self.lm_head = _weight(config, 2, (config.vocab, h), 1.0 / math.sqrt(h), device)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.first:
            h, residual = F.embedding(inputs["input_ids"], self.embed), None
        else:
            h, residual = inputs["hidden_states"], inputs["residual"]
        normed = bool(inputs.get("__normed__", False))
        if normed and not (self.config.fused_boundary_norm and not self.first):
            raise ValueError("a pre-normed input needs fused_boundary_norm on a later stage")
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, normed=normed and i == 0)
        if self.last:
            h, _ = self.final_norm(h, residual)
            return {"logits": F.linear(h, self.lm_head)}
        return {"hidden_states": h, "residual": residual}


def build_stage(
    config: ModelConfig, stage: int, num_stages: int, device: torch.device | str = "cpu"
) -> PipelineStage:
    """The module of ``stage`` of ``num_stages``, with its layers' deterministic weights."""
    return PipelineStage(config, stage, num_stages, device).eval()


@torch.no_grad()
def reference_forward(
    config: ModelConfig,
    tokens: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_stages: int = 1,
    device: torch.device | str = "cpu",
    stages: Sequence[nn.Module] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """The one-process run: every stage module built here and called in order.

    ``tokens`` is one micro-batch (``[T]`` ids; returns its ``[T, vocab]`` logits) or a list of
    them (returns a list). Pass the pipeline's own ``stages`` to reuse modules already built.
    """
    if stages is None:
        stages = [build_stage(config, s, num_stages, device) for s in range(num_stages)]
    single = isinstance(tokens, torch.Tensor)
    outs = []
    for ids in [tokens] if single else tokens:
        x: dict[str, torch.Tensor] = {"input_ids": ids.to(device)}
        for module in stages:
            x = module(x)
        outs.append(x["logits"])
    return outs[0] if single else outs


def sample_tokens(
    config: ModelConfig, sizes: Sequence[int], *, seed: int = 1
) -> list[torch.Tensor]:
    """Deterministic token-id micro-batches of the given lengths (CPU, int64)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab, (n,), generator=g, dtype=torch.int64) for n in sizes]


def boundary_example(
    config: ModelConfig, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A one-token stage-boundary dict: what ``Declared.from_example`` needs to declare a hop."""
    z = torch.zeros(1, config.hidden, dtype=config.dtype, device=device)
    return {"hidden_states": z, "residual": z.clone()}
