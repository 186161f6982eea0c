"""Analytic FLOPs of one pretraining sample, and MFU / HFU from a measured throughput.

Counting rules (reference/performance.md). One multiply-accumulate is 2 FLOPs. A transformer block
over n tokens at width d, FFN width f, whose cross-attention reads a memory of m tokens (m = 0: no
cross-attention), costs forward

    self-attention   8*n*d^2 + 4*n^2*d           Q, K, V, O projections; scores and weighted sum
    cross-attention  4*n*d^2 + 4*m*d^2 + 4*n*m*d  Q/O over the queries, K/V over the memory
    FFN              4*n*d*f

so a plain block with f = 4d costs the familiar 24*n*d^2 + 4*n^2*d. A dense projection of t tokens
from a to b features costs 2*t*a*b (the ViT patch embedding, the vision-to-text bridge, the ITC
projections and similarities, the ITM head, the MLM and LM heads over the vocabulary). Biases,
LayerNorm, softmax, activation functions and embedding lookups are left out.

One training step runs the passes of `MPLUGPretraining.forward`, listed by `step_passes`:

    vision       1 pass over Lv = (image_size / patch_size)^2 + 1 tokens
    text encoder 1 pass for ITC and ITM together, 1 for MLM (masked ids), 1 for PrefixLM
    fusion       3 pairs per sample for ITM (positive, negative image, negative text), 1 for MLM,
                 1 for PrefixLM
    decoder      1 pass for PrefixLM over L tokens, cross-attending to [v ; l] (Lv + L tokens)
    momentum     no gradient: the vision copy; the text encoder copy for ITC; with distillation the
                 text encoder, fusion and MLM head copies over the masked text, and the ITC soft
                 targets' similarities

Every text-side pass runs at the batch's padded length L (`data.max_text_length` unless a length
is given): the PrefixLM prefix is a padding mask over the full caption and the decoder reads a
sequence of the same length, so where the caption is split changes no FLOPs, and the decoder's
causal mask is an explicit mask under which every score is computed. The counts assume steady
state with distillation on (alpha > 0, true from the second step when `objectives.distill`).
The ITM hard-negative sampling similarities (O(E * global batch) per sample) are left out.

Training FLOPs per sample = 3 x the forward of the passes that get gradients + 1 x the forward of
the no-gradient passes. Model FLOPs utilisation (MFU) counts this useful work only; hardware FLOPs
utilisation (HFU) adds one more forward of every checkpointed block when
`model.grad_checkpointing` is on, since the backward recomputes it.

MFU needs a peak FLOP/s. `PEAK_FLOPS` holds the dense (no structured sparsity) peaks of common
GPUs from NVIDIA's data sheets; `peak_flops_for` looks one up from `torch.cuda.get_device_name()`.
A CPU has no standard peak (it depends on the core count, the vector units and the clock), so on
a CPU, or on an unlisted GPU, MFU is reported only against a peak the user gives explicitly
(`resolve_peak_flops(..., explicit=...)`), or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.schema import Config, TextConfig, VisionConfig
from pretrain.models.fusion import fusion_pattern

Part = Literal["vision", "text_encoder", "fusion", "decoder", "heads"]
PARTS: tuple[Part, ...] = ("vision", "text_encoder", "fusion", "decoder", "heads")
Precision = Literal["bf16", "fp16", "fp32"]

GIGA = 1e9
FLOPS_PER_MAC = 2
IMAGE_CHANNELS = 3  # RGB input of the ViT patch embedding
BACKWARD_TO_FORWARD = 2  # the backward computes gradients of inputs and of weights: 2x forward
ITM_PAIRS_PER_SAMPLE = 3  # the positive pair, one negative image, one negative text
ITM_CLASSES = 2


@dataclass(frozen=True)
class LayerShape:
    """One transformer block as its matmuls see it, for one sequence."""

    tokens: int  # n: the queries of its self-attention and the tokens of its FFN
    width: int  # d
    heads: int
    ffn_width: int  # f
    memory: int = 0  # m: tokens its cross-attention reads; 0 = no cross-attention
    quick_gelu: bool = False  # x * sigmoid(1.702 x) keeps one more (n, f) tensor than GELU

    def forward_flops(self) -> int:
        n, d, m = self.tokens, self.width, self.memory
        flops = attention_flops(n, n, d) + ffn_flops(n, d, self.ffn_width)
        if m:
            flops += attention_flops(n, m, d)
        return flops


@dataclass(frozen=True)
class Matmul:
    """A dense projection outside the blocks: `tokens` rows from `in_features` to `out_features`."""

    tokens: float
    in_features: int
    out_features: int
    # Rows of the output the loss keeps in fp32 for the backward (log-probabilities, and the soft
    # targets they are multiplied with); when > 0 the output itself is kept too (activation memory).
    loss_rows: float = 0.0

    def forward_flops(self) -> float:
        return FLOPS_PER_MAC * self.tokens * self.in_features * self.out_features


@dataclass(frozen=True)
class Pass:
    """One run of one part of the model for one sample of a training step."""

    part: Part
    objective: str  # what runs it: "itc", "itm", "mlm", "prefix_lm", or a share ("itc+itm", "all")
    layers: tuple[LayerShape, ...] = ()
    matmuls: tuple[Matmul, ...] = ()
    sequences: int = 1  # sequences per sample: ITM fuses 3 pairs per sample
    grad: bool = True  # False: momentum copies and anything else under no_grad
    checkpointed: bool = False  # its blocks are recomputed in the backward pass

    @property
    def memory_tokens(self) -> int:
        """Tokens of the memory its layers share by reference (vision states, or [v ; l])."""
        return max((layer.memory for layer in self.layers), default=0)

    def layer_flops(self) -> float:
        return self.sequences * sum(layer.forward_flops() for layer in self.layers)

    def forward_flops(self) -> float:
        return self.layer_flops() + self.sequences * sum(mm.forward_flops() for mm in self.matmuls)


def attention_flops(queries: int, keys: int, width: int) -> int:
    """Q/O projections over the queries, K/V over the keys, scores and weighted sum queries x keys."""
    return 4 * queries * width**2 + 4 * keys * width**2 + 4 * queries * keys * width


def ffn_flops(tokens: int, width: int, ffn_width: int) -> int:
    return 2 * FLOPS_PER_MAC * tokens * width * ffn_width


def transformer_layer_flops(tokens: int, width: int, ffn_width: int | None = None) -> int:
    """Forward FLOPs of a self-attention block: 24*n*d^2 + 4*n^2*d when ffn_width is 4d (default)."""
    return LayerShape(tokens, width, heads=1, ffn_width=ffn_width or 4 * width).forward_flops()


def fusion_layer_flops(
    kind: str, text_tokens: int, visual_tokens: int, width: int, ffn_width: int
) -> int:
    """One fusion layer: 'co' (text self- and cross-attention, text FFN) or 'connected' ([v ; l])."""
    return fusion_layer_shape(kind, text_tokens, visual_tokens, width, 1, ffn_width).forward_flops()


def fusion_layer_shape(
    kind: str, text: int, image: int, width: int, heads: int, ffn_width: int
) -> LayerShape:
    if kind == "co":
        return LayerShape(text, width, heads, ffn_width, memory=image)
    if kind == "connected":
        return LayerShape(text + image, width, heads, ffn_width)
    raise ValueError(f"fusion layer kind {kind!r} is not one of 'co', 'connected'")


def image_tokens(vision: VisionConfig) -> int:
    """[CLS] + (image_size / patch_size)^2 patches, as `VisionEncoder.num_tokens`."""
    return 1 + (vision.image_size // vision.patch_size) ** 2


def vit_forward_flops(vision: VisionConfig) -> int:
    """One image through the ViT's patch embedding and blocks (no projection to the text width)."""
    patch = vit_patch_embedding(vision)
    return int(patch.forward_flops()) + sum(layer.forward_flops() for layer in vit_layers(vision))


def vit_layers(vision: VisionConfig) -> tuple[LayerShape, ...]:
    layer = LayerShape(
        image_tokens(vision),
        vision.width,
        vision.heads,
        round(vision.mlp_ratio * vision.width),
        quick_gelu=vision.quick_gelu,
    )
    return (layer,) * vision.depth


def vit_patch_embedding(vision: VisionConfig) -> Matmul:
    """The patch convolution as a matmul: each patch's 3*p*p pixels to the ViT width."""
    return Matmul(image_tokens(vision) - 1, IMAGE_CHANNELS * vision.patch_size**2, vision.width)


def vocabulary_head(text: TextConfig, tokens: int, loss_rows: float) -> tuple[Matmul, ...]:
    """BERT's prediction head: a d x d transform, then d x V logits at every position."""
    return (
        Matmul(tokens, text.width, text.width),
        Matmul(tokens, text.width, text.vocab_size, loss_rows=loss_rows),
    )


@dataclass(frozen=True)
class TextLengths:
    """Padded token counts of the text-side passes of one step."""

    text: int  # L: the caption as ITC, ITM and MLM read it
    prefix: int  # the PrefixLM prefix through the text encoder and fusion
    target: int  # the PrefixLM decoder input

    @classmethod
    def resolve(
        cls,
        config: Config,
        text: int | None = None,
        prefix: int | None = None,
        target: int | None = None,
    ) -> TextLengths:
        """`data.max_text_length` for L by default; the PrefixLM passes run at L unless given.

        The PrefixLM code masks the prefix inside the full padded caption and gives the decoder a
        sequence of the same length, so L is what it runs; shorter lengths describe an
        implementation that trims the padding (reference/performance.md assumes L/2 and L/2).
        """
        length = config.data.max_text_length if text is None else text
        lengths = cls(
            length, length if prefix is None else prefix, length if target is None else target
        )
        for name, value in vars(lengths).items():
            if value < 1:
                raise ValueError(f"the {name} length must be >= 1 token, got {value}")
        return lengths


def step_passes(
    config: Config,
    *,
    text_tokens: int | None = None,
    prefix_tokens: int | None = None,
    target_tokens: int | None = None,
) -> tuple[Pass, ...]:
    """Every pass one sample takes through the model in one training step, in forward order.

    text_tokens: the padded text length L of the batch, `data.max_text_length` when not given;
    prefix_tokens, target_tokens: the PrefixLM lengths, L when not given (see `TextLengths`).
    """
    model, obj, text = config.model, config.objectives, config.model.text
    lengths = TextLengths.resolve(config, text_tokens, prefix_tokens, target_tokens)
    lv, d, embed = image_tokens(model.vision), text.width, model.embed_dim
    distill = obj.distill and obj.alpha > 0
    itc_keys = config.train.batch_size + model.queue_size  # the local batch and the queue
    ckpt = model.grad_checkpointing

    vision_matmuls = (vit_patch_embedding(model.vision),)
    if model.vision.width != d:
        vision_matmuls += (Matmul(lv, model.vision.width, d),)  # the vision-to-text bridge

    def encoder(length: int) -> tuple[LayerShape, ...]:
        return (LayerShape(length, d, text.heads, text.intermediate),) * text.encoder_layers

    def fusion(length: int) -> tuple[LayerShape, ...]:
        kinds = fusion_pattern(model.fusion.layers, model.fusion.stride)
        return tuple(
            fusion_layer_shape(kind, length, lv, d, text.heads, text.intermediate) for kind in kinds
        )

    decoder = (
        LayerShape(lengths.target, d, text.heads, text.intermediate, memory=lv + lengths.prefix),
    )
    decoder *= text.decoder_layers
    mlm_rows = obj.mlm_probability * lengths.text * (2 if distill else 1)  # log-probs, soft labels

    def trained(part: Part, objective: str, layers: tuple[LayerShape, ...], **kw) -> Pass:
        return Pass(part, objective, layers, checkpointed=ckpt, **kw)

    passes = [trained("vision", "all", vit_layers(model.vision), matmuls=vision_matmuls)]
    if obj.itc or (obj.mlm and distill):
        passes.append(
            Pass("vision", "itc+mlm", vit_layers(model.vision), vision_matmuls, grad=False)
        )
    projections = (Matmul(1, d, embed), Matmul(1, d, embed))  # image and text [CLS]
    similarities = (Matmul(1, embed, itc_keys, loss_rows=2 if distill else 1),) * 2  # i2t, t2i
    if obj.itc or obj.itm:  # ITM samples its hard negatives with the ITC features
        passes.append(trained("text_encoder", "itc+itm", encoder(lengths.text)))
        passes.append(Pass("heads", "itc+itm", matmuls=projections))
    if obj.itc:
        passes.append(Pass("text_encoder", "itc", encoder(lengths.text), grad=False))
        passes.append(Pass("heads", "itc", matmuls=similarities))
        momentum_heads = projections + (similarities if distill else ())  # soft targets need sims
        passes.append(Pass("heads", "itc", matmuls=momentum_heads, grad=False))
    if obj.itm:
        passes.append(
            trained("fusion", "itm", fusion(lengths.text), sequences=ITM_PAIRS_PER_SAMPLE)
        )
        passes.append(
            Pass(
                "heads", "itm", matmuls=(Matmul(1, d, ITM_CLASSES),), sequences=ITM_PAIRS_PER_SAMPLE
            )
        )
    if obj.mlm:
        passes.append(trained("text_encoder", "mlm", encoder(lengths.text)))
        passes.append(trained("fusion", "mlm", fusion(lengths.text)))
        passes.append(Pass("heads", "mlm", matmuls=vocabulary_head(text, lengths.text, mlm_rows)))
        if distill:
            passes.append(Pass("text_encoder", "mlm", encoder(lengths.text), grad=False))
            passes.append(Pass("fusion", "mlm", fusion(lengths.text), grad=False))
            passes.append(
                Pass("heads", "mlm", matmuls=vocabulary_head(text, lengths.text, 0), grad=False)
            )
    if obj.prefix_lm:
        passes.append(trained("text_encoder", "prefix_lm", encoder(lengths.prefix)))
        passes.append(trained("fusion", "prefix_lm", fusion(lengths.prefix)))
        passes.append(trained("decoder", "prefix_lm", decoder))
        head = vocabulary_head(text, lengths.target, loss_rows=lengths.target)
        passes.append(Pass("heads", "prefix_lm", matmuls=head))
    return tuple(passes)


@dataclass(frozen=True)
class ForwardGFLOP:
    """Forward GFLOP per sample of one training step, summed over every pass of each part."""

    vision: float  # with gradients: the ViT, its patch embedding and the bridge to the text width
    text_encoder: float
    fusion: float
    decoder: float
    heads: float  # ITC projections and similarities, ITM head, MLM and LM heads
    momentum: float  # without gradients: the momentum copies and the ITC soft targets

    @property
    def with_grad(self) -> float:
        return self.vision + self.text_encoder + self.fusion + self.decoder + self.heads


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs of one training sample of a configured model, and the utilisation they imply."""

    name: str  # config name
    image_tokens: int  # Lv
    lengths: TextLengths
    forward: ForwardGFLOP
    recompute_gflop: float  # forward of the checkpointed blocks, run again in the backward

    @property
    def model_gflop(self) -> float:
        """Training GFLOP per sample that MFU counts: 3x the gradient forward + the no-grad forward."""
        return (1 + BACKWARD_TO_FORWARD) * self.forward.with_grad + self.forward.momentum

    @property
    def hardware_gflop(self) -> float:
        """Training GFLOP per sample the hardware executes: the model FLOPs plus recomputation."""
        return self.model_gflop + self.recompute_gflop

    def mfu(self, samples_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation in [0, 1] at `samples_per_second`, against `peak_flops` FLOP/s.

        Both must describe the same devices: samples/s of one GPU with that GPU's peak, or of the
        whole job with the peak times the number of GPUs.
        """
        return utilisation(self.model_gflop, samples_per_second, peak_flops)

    def hfu(self, samples_per_second: float, peak_flops: float) -> float:
        """Hardware FLOPs utilisation: like `mfu`, counting the recomputed forward too."""
        return utilisation(self.hardware_gflop, samples_per_second, peak_flops)


def utilisation(gflop_per_sample: float, samples_per_second: float, peak_flops: float) -> float:
    if peak_flops <= 0:
        raise ValueError(
            f"peak FLOP/s must be > 0, got {peak_flops}; give the device's dense peak, e.g. 989e12"
        )
    if samples_per_second < 0:
        raise ValueError(f"samples per second must be >= 0, got {samples_per_second}")
    return gflop_per_sample * GIGA * samples_per_second / peak_flops


def flops_per_sample(
    config: Config,
    *,
    text_tokens: int | None = None,
    prefix_tokens: int | None = None,
    target_tokens: int | None = None,
) -> SampleFlops:
    """The analytic FLOPs of one training sample of `config` (see the module docstring).

    text_tokens: the padded text length, `data.max_text_length` when not given; the trainer can
    pass its batch's `input_ids.shape[1]`. prefix_tokens, target_tokens: see `TextLengths`.
    """
    lengths = TextLengths.resolve(config, text_tokens, prefix_tokens, target_tokens)
    passes = step_passes(
        config, text_tokens=lengths.text, prefix_tokens=lengths.prefix, target_tokens=lengths.target
    )
    with_grad: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    momentum = recompute = 0.0
    for p in passes:
        if p.grad:
            with_grad[p.part] += p.forward_flops()
        else:
            momentum += p.forward_flops()
        if p.checkpointed:
            recompute += p.layer_flops()
    return SampleFlops(
        name=config.name,
        image_tokens=image_tokens(config.model.vision),
        lengths=lengths,
        forward=ForwardGFLOP(
            **{part: f / GIGA for part, f in with_grad.items()}, momentum=momentum / GIGA
        ),
        recompute_gflop=recompute / GIGA,
    )


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakFlops:
    """Dense peak FLOP/s of one GPU per precision; None where it has no such tensor-core path."""

    bf16: float | None
    fp16: float | None
    fp32: float | None  # plain fp32 (CUDA cores); TF32 tensor cores run only when enabled

    def for_precision(self, precision: Precision) -> float | None:
        return getattr(self, precision)


# NVIDIA data sheets, dense (without 2:4 sparsity), SXM boards unless named. Matched in this order
# against `torch.cuda.get_device_name()` (e.g. "NVIDIA H100 80GB HBM3"), so specific names first.
PEAK_FLOPS: dict[str, PeakFlops] = {
    "H100 NVL": PeakFlops(bf16=835e12, fp16=835e12, fp32=60e12),
    "H100 PCIe": PeakFlops(bf16=756e12, fp16=756e12, fp32=51e12),
    "H100": PeakFlops(bf16=989e12, fp16=989e12, fp32=67e12),
    "H200 NVL": PeakFlops(bf16=835e12, fp16=835e12, fp32=60e12),
    "H200": PeakFlops(bf16=989e12, fp16=989e12, fp32=67e12),
    "A100": PeakFlops(bf16=312e12, fp16=312e12, fp32=19.5e12),
    "L40S": PeakFlops(bf16=362e12, fp16=362e12, fp32=91.6e12),
    "L4": PeakFlops(bf16=121e12, fp16=121e12, fp32=30.3e12),
    "V100": PeakFlops(bf16=None, fp16=125e12, fp32=15.7e12),
}


def peak_flops_for(device_name: str, precision: Precision) -> float | None:
    """The table's dense peak for a device name, or None: a CPU, an unlisted GPU, or no such path."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision {precision!r} is not one of 'bf16', 'fp16', 'fp32'")
    name = device_name.lower()
    for key, peak in PEAK_FLOPS.items():
        if key.lower() in name:
            return peak.for_precision(precision)
    return None


def resolve_peak_flops(
    device_name: str | None, precision: Precision, explicit: float | None = None
) -> float | None:
    """The peak MFU is measured against: `explicit` when given, else the table's, else None.

    None means no MFU is reported (a CPU, or a GPU the table does not list: pass `explicit`).
    """
    if explicit is not None:
        if explicit <= 0:
            raise ValueError(f"an explicit peak must be > 0 FLOP/s, got {explicit}")
        return explicit
    return None if device_name is None else peak_flops_for(device_name, precision)
