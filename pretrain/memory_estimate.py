"""Per-rank GPU memory of a pretraining run, estimated before it starts.

Nothing is allocated: parameter counts come from the model built on the meta device
(`pretrain.models.summary`), activations from the passes one step runs (`pretrain.flops`).

Model states (the ZeRO paper's accounting, bytes per parameter, p = 2 at bf16/fp16, 4 at fp32):

    parameters   p                    in the training precision
    gradients    p
    optimizer    4 + 4 + 4 at bf16/fp16: fp32 master weights and AdamW's two fp32 moments;
                 4 + 4 at fp32 (the parameters are their own master copy)
    momentum     p per EMA parameter: no gradient, no optimizer state

so mixed precision costs 2 + 2 + 12 = 16 bytes per trained parameter. ZeRO over N ranks divides by
N the optimizer states (stage >= 1), the gradients (stage >= 2) and the parameters (stage 3).
Assumption: the momentum copies are parameters of the module DeepSpeed wraps, so they are cast to
the training precision with it, stay whole on every rank under stages 0-2, and are partitioned like
every other parameter under stage 3.

Activations: the tensors the passes with gradients keep for the backward, for `train.batch_size`
samples (the micro-batch per rank). One block over n tokens at width d, FFN width f, with a heads,
reading a memory of m tokens, keeps per sequence (p bytes a value, k = 1 byte where dropout is on):

    self-attention   6*n*d*p + k*n*d            Q/K/V input, Q, K, V, output input, LN input
    cross-attention  4*n*d*p + 2*m*d*p + k*n*d  Q input, Q, output input, LN input; K, V of memory
    FFN              2*n*d*p + g*n*f*p + k*n*d  FC1 and LN inputs; g = 2 (activation input, FC2
                                                input), 3 for QuickGELU, which keeps its sigmoid
    scores           a*n*(n + m)*(p + k*(1+p))  "math" attention kernel only: softmax output,
                                                dropout mask, dropped probabilities

At 16 bits with dropout, f = 4d, GELU and the math kernel a plain layer keeps n*d*(34 + 5*a*n/d)
bytes (Korthikanti et al., 2022). SDPA's flash and memory-efficient kernels (the default here, what
runs on GPUs) keep no n x m scores. A memory tensor shared by all layers of a pass is counted once
per pass, and each pass keeps its input and output (2*n*d*p). Projections outside the blocks keep
their input; vocabulary heads also keep their logits and the fp32 rows the loss saves.
With activation checkpointing a block keeps only its input (n*d*p), and during the backward one
block at a time rebuilds its activations: the largest such block is added once.

Not counted: the CUDA context, allocator fragmentation, DeepSpeed's communication buckets and
ZeRO-3 prefetch (set by the DeepSpeed config), and transient tensors (the no-grad momentum outputs,
the backward's gradient buffers). Leave headroom for them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pretrain.config.schema import Config
from pretrain.flops import PARTS, LayerShape, Matmul, Pass, Precision, step_passes
from pretrain.models.summary import summarize

AttentionKernel = Literal["fused", "math"]  # SDPA flash / memory-efficient, or scores in memory

BYTES_PER_VALUE: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32_BYTES = 4
MASK_BYTES = 1  # a dropout mask is a bool tensor
INDEX_BYTES = 8  # int64 image ids of the ITC queue
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32
ZERO_STAGES = (0, 1, 2, 3)
FFN_KEPT_WIDE_TENSORS = 2  # the activation's input and FC2's input, each (n, f)
QUICK_GELU_EXTRA_TENSORS = 1  # x * sigmoid(1.702 x) keeps the sigmoid as well
ITC_QUEUES = 2  # image and text feature queues, each (E, Q)
GIB = 2**30
MILLION = 1e6


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int  # online parameters: every one gets a gradient and optimizer state
    momentum: int = 0  # EMA copies: parameters without gradient or optimizer state


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes per rank of the parameters, their gradients and optimizer states, and the EMA copies."""

    parameters: float
    momentum: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.momentum + self.gradients + self.optimizer


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per rank the backward needs from the forward, by part, for one micro-batch."""

    vision: float
    text_encoder: float
    fusion: float
    decoder: float
    heads: float
    recompute: float  # with checkpointing: the largest block's activations, rebuilt in the backward

    @property
    def total(self) -> float:
        return (
            self.vision
            + self.text_encoder
            + self.fusion
            + self.decoder
            + self.heads
            + self.recompute
        )


@dataclass(frozen=True)
class MemoryEstimate:
    name: str  # config name
    world_size: int
    zero_stage: int
    precision: Precision
    micro_batch: int  # samples per rank per forward
    grad_checkpointing: bool
    attention: AttentionKernel
    counts: ParameterCounts
    states: ModelStateBytes
    activations: ActivationBytes
    buffers: float  # the ITC feature queue, whole on every rank

    @property
    def total_bytes(self) -> float:
        return self.states.total + self.activations.total + self.buffers


def value_bytes(precision: str) -> int:
    if precision not in BYTES_PER_VALUE:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(BYTES_PER_VALUE)}")
    return BYTES_PER_VALUE[precision]


def check_choices(precision: str, zero_stage: int, world_size: int) -> None:
    value_bytes(precision)
    if zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"ZeRO stage {zero_stage!r} is not one of {', '.join(map(str, ZERO_STAGES))}"
        )
    if world_size < 1:
        raise ValueError(f"world size must be >= 1 rank, got {world_size}")


def model_state_bytes(
    counts: ParameterCounts, *, precision: Precision, zero_stage: int, world_size: int
) -> ModelStateBytes:
    """Per-rank bytes of the model states under ZeRO `zero_stage` over `world_size` ranks."""
    check_choices(precision, zero_stage, world_size)
    value = value_bytes(precision)
    master = FP32_BYTES if value != FP32_BYTES else 0
    optimizer_per_param = master + ADAM_MOMENTS * FP32_BYTES

    def share(nbytes: float, partitioned: bool) -> float:
        return nbytes / world_size if partitioned else nbytes

    return ModelStateBytes(
        parameters=share(counts.trainable * value, zero_stage >= 3),
        momentum=share(counts.momentum * value, zero_stage >= 3),
        gradients=share(counts.trainable * value, zero_stage >= 2),
        optimizer=share(counts.trainable * optimizer_per_param, zero_stage >= 1),
    )


def parameter_counts(config: Config) -> ParameterCounts:
    """Online and momentum parameter counts, from the model built on the meta device."""
    summary = summarize(config)
    return ParameterCounts(trainable=summary.total_params, momentum=summary.momentum_params)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def layer_activation_bytes(
    layer: LayerShape, *, bytes_per_value: int, dropout: bool, attention: AttentionKernel = "fused"
) -> float:
    """Bytes one block keeps for the backward, for one sequence (module docstring's formula)."""
    if attention not in ("fused", "math"):
        raise ValueError(f"attention kernel {attention!r} is not one of 'fused', 'math'")
    n, d, f, m, p = layer.tokens, layer.width, layer.ffn_width, layer.memory, bytes_per_value
    mask = MASK_BYTES if dropout else 0
    wide = FFN_KEPT_WIDE_TENSORS + (QUICK_GELU_EXTRA_TENSORS if layer.quick_gelu else 0)
    kept = 6 * n * d * p + mask * n * d  # self-attention
    kept += 2 * n * d * p + wide * n * f * p + mask * n * d  # FFN
    if m:
        kept += 4 * n * d * p + 2 * m * d * p + mask * n * d  # cross-attention
    if attention == "math":
        per_score = p + (MASK_BYTES + p if dropout else 0)
        kept += layer.heads * n * (n + m) * per_score
    return kept


def matmul_activation_bytes(mm: Matmul, bytes_per_value: int) -> float:
    """A projection keeps its input; a loss-bearing output is kept with its fp32 rows."""
    kept = mm.tokens * mm.in_features * bytes_per_value
    if mm.loss_rows:
        kept += (
            mm.tokens * mm.out_features * bytes_per_value
            + mm.loss_rows * mm.out_features * FP32_BYTES
        )
    return kept


@dataclass(frozen=True)
class PassActivations:
    kept: float  # bytes per sample kept until the backward
    recompute_peak: float  # bytes per sample of its largest block rebuilt during the backward


def pass_activation_bytes(
    step: Pass, *, bytes_per_value: int, dropout: bool, attention: AttentionKernel
) -> PassActivations:
    """Bytes per sample one pass with gradients keeps (0 for a no-grad pass)."""
    if not step.grad:
        return PassActivations(0.0, 0.0)
    p = bytes_per_value
    full = [
        layer_activation_bytes(layer, bytes_per_value=p, dropout=dropout, attention=attention)
        for layer in step.layers
    ]
    if step.checkpointed:
        blocks = sum(layer.tokens * layer.width * p for layer in step.layers)
        peak = max(full, default=0.0)
    else:
        blocks, peak = sum(full), 0.0
    kept = blocks + sum(matmul_activation_bytes(mm, p) for mm in step.matmuls)
    if step.layers:
        first = step.layers[0]
        kept += 2 * first.tokens * first.width * p  # the stack's input and output
        kept += step.memory_tokens * first.width * p  # the memory every layer reads
    return PassActivations(step.sequences * kept, step.sequences * peak)


def activation_bytes(
    config: Config,
    *,
    micro_batch: int,
    precision: Precision,
    grad_checkpointing: bool,
    attention: AttentionKernel = "fused",
    text_tokens: int | None = None,
) -> ActivationBytes:
    """Bytes per rank the passes with gradients keep for a micro-batch of `micro_batch` samples."""
    if micro_batch < 1:
        raise ValueError(f"micro-batch must be >= 1 sample per rank, got {micro_batch}")
    value = value_bytes(precision)
    model = config.model
    if grad_checkpointing != model.grad_checkpointing:
        config = replace(config, model=replace(model, grad_checkpointing=grad_checkpointing))
    by_part = dict.fromkeys(PARTS, 0.0)
    peak = 0.0
    for step in step_passes(config, text_tokens=text_tokens):
        dropout = step.part != "vision" and model.text.dropout > 0  # CLIP's ViT has no dropout
        kept = pass_activation_bytes(
            step, bytes_per_value=value, dropout=dropout, attention=attention
        )
        by_part[step.part] += micro_batch * kept.kept
        peak = max(peak, micro_batch * kept.recompute_peak)
    return ActivationBytes(**by_part, recompute=peak)


def itc_queue_bytes(config: Config, precision: Precision) -> float:
    """The ITC queue's feature buffers (cast with the module) and its int64 image ids."""
    queue = config.model.queue_size
    return (
        ITC_QUEUES * config.model.embed_dim * queue * value_bytes(precision) + queue * INDEX_BYTES
    )


def estimate_memory(
    config: Config,
    *,
    world_size: int = 1,
    zero_stage: int | None = None,
    precision: Precision | None = None,
    micro_batch: int | None = None,
    grad_checkpointing: bool | None = None,
    attention: AttentionKernel = "fused",
    text_tokens: int | None = None,
    counts: ParameterCounts | None = None,
) -> MemoryEstimate:
    """Per-rank memory of training `config` on `world_size` ranks.

    Every keyword left None comes from the config (`train.zero_stage`, `train.precision`,
    `train.batch_size`, `model.grad_checkpointing`, `data.max_text_length`); `counts` defaults to
    the meta-device parameter counts of `config`.
    """
    train = config.train
    zero_stage = train.zero_stage if zero_stage is None else zero_stage
    precision = train.precision if precision is None else precision
    micro_batch = train.batch_size if micro_batch is None else micro_batch
    checkpointing = (
        config.model.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    )
    check_choices(precision, zero_stage, world_size)
    counts = parameter_counts(config) if counts is None else counts
    return MemoryEstimate(
        name=config.name,
        world_size=world_size,
        zero_stage=zero_stage,
        precision=precision,
        micro_batch=micro_batch,
        grad_checkpointing=checkpointing,
        attention=attention,
        counts=counts,
        states=model_state_bytes(
            counts, precision=precision, zero_stage=zero_stage, world_size=world_size
        ),
        activations=activation_bytes(
            config,
            micro_batch=micro_batch,
            precision=precision,
            grad_checkpointing=checkpointing,
            attention=attention,
            text_tokens=text_tokens,
        ),
        buffers=itc_queue_bytes(config, precision),
    )


def format_memory_estimate(estimate: MemoryEstimate) -> str:
    """A table of the per-rank estimate in GiB, for `mplug pretrain --estimate-memory`."""
    e, states, act = estimate, estimate.states, estimate.activations
    checkpointing = "on" if e.grad_checkpointing else "off"
    rows = [
        ("parameters", states.parameters, f"{e.counts.trainable / MILLION:.1f}M trained"),
        (
            "momentum copies",
            states.momentum,
            f"{e.counts.momentum / MILLION:.1f}M EMA, no gradients",
        ),
        ("gradients", states.gradients, ""),
        (
            "optimizer states",
            states.optimizer,
            "AdamW: fp32 moments" + (" + master" if e.precision != "fp32" else ""),
        ),
        ("activations", act.total, f"{e.attention} attention kernel"),
        ("  vision", act.vision, ""),
        ("  text encoder", act.text_encoder, ""),
        ("  fusion", act.fusion, ""),
        ("  decoder", act.decoder, ""),
        ("  heads", act.heads, "logits over the vocabulary"),
        (
            "  recompute",
            act.recompute,
            "largest checkpointed block" if e.grad_checkpointing else "",
        ),
        ("ITC queue", e.buffers, ""),
    ]
    label = max(len(name) for name, _, _ in rows) + 2
    lines = [
        f"memory per rank: {e.name}, {e.world_size} rank(s), ZeRO stage {e.zero_stage}, {e.precision}, "
        f"micro-batch {e.micro_batch}, activation checkpointing {checkpointing}",
        f"  {'part':<{label}}{'GiB':>9}",
    ]
    lines += [
        f"  {name:<{label}}{nbytes / GIB:>9.2f}  {note}".rstrip() for name, nbytes, note in rows
    ]
    lines.append(f"  {'total':<{label}}{e.total_bytes / GIB:>9.2f}")
    lines.append(
        "  not counted: CUDA context, allocator fragmentation, DeepSpeed buckets and ZeRO-3 prefetch"
    )
    return "\n".join(lines)
