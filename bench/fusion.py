"""Forward+backward time of the fusion stack for three layer patterns, beside their analytic FLOPs.

The skip-connected fusion (reference/mplug.md) saves compute by keeping most layers asymmetric:
the text attends to the visual tokens, but the long visual sequence gets no self-attention. This
script times the F-layer stack (base width, dropout 0) at 257 and 577 visual tokens for

- skip:      stride 3, co,co,co,connected,co,co (the released base config)
- co:        stride >= F, every layer asymmetric co-attention
- connected: stride 1, every layer connected except j == 0, which the reference's rule
             (j == 0 or j % S != 0 -> co) always makes co-attention

and prints, per pattern, the analytic forward GFLOP, the median fwd+bwd time and both as ratios
to the skip pattern measured in the same run (on a shared, noisy machine only ratios and medians
mean anything). The patterns run round-robin in every repeat so drifts of the machine hit all
alike, and the time ratio is the median of the per-repeat ratios. The same table, the raw
timings and the machine go to a JSON file.

    .venv/bin/python bench/fusion.py [--repeats 5] [--batch 2] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config.schema import FusionConfig, TextConfig
from pretrain.flops import fusion_layer_flops  # the analytic count of reference/performance.md
from pretrain.models.fusion import FusionEncoder, LayerKind, fusion_pattern

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "fusion.json"
VISUAL_TOKENS = (257, 577)  # ViT-B/16 at 256 px and ViT-L/14 at 336 px, with the CLS token
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIGA = 1e9

# The reference's analytic cost of one fusion layer, in GMAC, at d=768 and 40 text tokens:
# (visual tokens, layer kind) -> GMAC, quoted to two decimals (reference/mplug.md).
REFERENCE_GMAC: dict[tuple[int, LayerKind], float] = {
    (257, "co"): 0.65,
    (257, "connected"): 2.24,
    (577, "co"): 1.05,
    (577, "connected"): 4.95,
}
REFERENCE_TOLERANCE_GMAC = 0.005  # half a unit in the last quoted digit
REFERENCE_TEXT_TOKENS = 40
REFERENCE_WIDTH = 768


def stack_flops(pattern: list[LayerKind], text: int, visual: int, cfg: TextConfig) -> int:
    return sum(fusion_layer_flops(kind, text, visual, cfg.width, cfg.intermediate) for kind in pattern)


def check_against_reference() -> list[dict]:
    """Our per-layer formula at the reference's sizes vs its quoted GMAC; raise on a mismatch."""
    rows = []
    intermediate = 4 * REFERENCE_WIDTH
    for (visual, kind), reference in REFERENCE_GMAC.items():
        flops = fusion_layer_flops(kind, REFERENCE_TEXT_TOKENS, visual, REFERENCE_WIDTH, intermediate)
        ours = flops / 2 / GIGA  # one multiply-accumulate is two FLOPs
        ok = abs(ours - reference) <= REFERENCE_TOLERANCE_GMAC
        rows.append(
            {
                "visual_tokens": visual,
                "kind": kind,
                "ours_gmac": ours,
                "reference_gmac": reference,
                "ok": ok,
            }
        )
    print(f"FLOP formula check (one layer, d={REFERENCE_WIDTH}, Lt={REFERENCE_TEXT_TOKENS}):")
    print("| visual tokens | layer | ours GMAC | reference GMAC | match |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['visual_tokens']} | {r['kind']} | {r['ours_gmac']:.3f} "
            f"| {r['reference_gmac']:.2f} | {'yes' if r['ok'] else 'NO'} |"
        )
    print()
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise SystemExit(f"the per-layer FLOP formula disagrees with reference/mplug.md: {bad}")
    return rows


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Pattern:
    name: str
    stride: int
    note: str


def patterns(layers: int) -> list[Pattern]:
    """The skip pattern first: every ratio is taken to it."""
    return [
        Pattern("skip", 3, "stride 3, the released base config"),
        Pattern("co", layers, f"stride {layers} >= layers: never connected"),
        Pattern("connected", 1, "stride 1; j == 0 is always co by the reference's rule"),
    ]


@dataclass
class Inputs:
    text: torch.Tensor  # (B, Lt, D), requires grad: the text encoder below is trained too
    text_mask: torch.Tensor  # (B, Lt), all ones
    vision: torch.Tensor  # (B, Lv, D), requires grad: so is the vision encoder
    grad_text: torch.Tensor  # (B, Lt, D), the upstream gradient fed to backward
    grad_vision: torch.Tensor  # (B, Lv, D)


def make_inputs(
    batch: int, text: int, visual: int, width: int, device: torch.device, dtype: torch.dtype
) -> Inputs:
    def leaf(length: int) -> torch.Tensor:
        return torch.randn(batch, length, width, device=device, dtype=dtype).requires_grad_()

    return Inputs(
        text=leaf(text),
        text_mask=torch.ones(batch, text, dtype=torch.long, device=device),
        vision=leaf(visual),
        grad_text=torch.randn(batch, text, width, device=device, dtype=dtype),
        grad_vision=torch.randn(batch, visual, width, device=device, dtype=dtype),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(model: FusionEncoder, x: Inputs, device: torch.device) -> float:
    """Seconds for one forward and backward pass (gradients of weights and both inputs)."""
    # Zero in place (after the warm-up step made them): a trainer keeps its gradient buffers,
    # so their first allocation is not part of a step.
    model.zero_grad(set_to_none=False)
    for leaf in (x.text, x.vision):
        if leaf.grad is not None:
            leaf.grad.zero_()
    synchronize(device)
    start = time.perf_counter()
    out = model(x.text, x.text_mask, x.vision)
    # With no connected layer out.vision is the input itself: backward then only accumulates.
    torch.autograd.backward([out.text, out.vision], [x.grad_text, x.grad_vision])
    synchronize(device)
    return time.perf_counter() - start


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = names[0] if names else platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    text_cfg = TextConfig(dropout=0.0)
    torch.manual_seed(args.seed)
    flop_check = check_against_reference()

    models = {}
    for p in patterns(args.layers):
        model = FusionEncoder(text_cfg, FusionConfig(layers=args.layers, stride=p.stride))
        models[p.name] = model.to(device=device, dtype=dtype).train()

    rows = []
    for visual in args.visual_tokens:
        x = make_inputs(args.batch, args.text_tokens, visual, text_cfg.width, device, dtype)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for step in range(args.warmup + args.repeats):
            # Round-robin, so noise hits every pattern alike; the order rotates each repeat so no
            # pattern always runs first (or always right after the same one).
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = time_step(models[name], x, device)
                if step >= args.warmup:
                    times[name].append(seconds * 1e3)
            print(
                f"  {visual} visual tokens: repeat {step + 1}/{args.warmup + args.repeats}",
                flush=True,
            )
        for p in patterns(args.layers):
            kinds = fusion_pattern(args.layers, p.stride)
            flops = stack_flops(kinds, args.text_tokens, visual, text_cfg)
            rows.append(
                {
                    "visual_tokens": visual,
                    "pattern": p.name,
                    "stride": p.stride,
                    "note": p.note,
                    "layer_kinds": kinds,
                    "gflop_fwd_per_sample": flops / GIGA,
                    "gflop_fwd_batch": flops * args.batch / GIGA,
                    "median_ms": statistics.median(times[p.name]),
                    "min_ms": min(times[p.name]),  # noise from other jobs only ever adds time
                    "times_ms": times[p.name],
                }
            )
    for r in rows:  # ratios to the skip pattern at the same visual length, from this run
        skip = next(
            s for s in rows if s["visual_tokens"] == r["visual_tokens"] and s["pattern"] == "skip"
        )
        # Paired: each repeat's time over the skip time of the same round, then the median, so
        # a burst of load from other jobs on the machine cancels out of most pairs.
        paired = [t / t_skip for t, t_skip in zip(r["times_ms"], skip["times_ms"], strict=True)]
        r["time_ratios_to_skip"] = paired
        r["time_ratio_to_skip"] = statistics.median(paired)
        r["median_ms_ratio_to_skip"] = r["median_ms"] / skip["median_ms"]
        r["flop_ratio_to_skip"] = r["gflop_fwd_per_sample"] / skip["gflop_fwd_per_sample"]
        # Training work is ~3x forward (performance.md); achieved rate of the fwd+bwd step.
        r["achieved_gflops"] = 3 * r["gflop_fwd_batch"] / (r["median_ms"] / 1e3)

    return {
        "benchmark": "fusion fwd+bwd",
        "machine": machine(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch": args.batch,
        "text_tokens": args.text_tokens,
        "layers": args.layers,
        "width": text_cfg.width,
        "heads": text_cfg.heads,
        "intermediate": text_cfg.intermediate,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "flop_check": flop_check,
        "results": rows,
    }


def print_table(report: dict) -> None:
    print(
        f"\nFusion stack fwd+bwd, {report['layers']} layers, d={report['width']}, "
        f"Lt={report['text_tokens']}, batch {report['batch']}, {report['dtype']}, "
        f"{report['machine']['device']}, median of {report['repeats']}:"
    )
    print(
        "| visual tokens | pattern | GFLOP fwd/sample | median ms fwd+bwd "
        "| time / skip | FLOP / skip |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for r in report["results"]:
        print(
            f"| {r['visual_tokens']} | {r['pattern']} | {r['gflop_fwd_per_sample']:.2f} "
            f"| {r['median_ms']:.1f} | {r['time_ratio_to_skip']:.2f} "
            f"| {r['flop_ratio_to_skip']:.2f} |"
        )
    print("time / skip: median over repeats of the ratio to the skip step of the same round")
    seen = set()
    for r in report["results"]:
        if r["pattern"] not in seen:
            seen.add(r["pattern"])
            print(f"{r['pattern']}: {','.join(r['layer_kinds'])} ({r['note']})")


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # write then rename: no half-written results
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per pattern")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per pattern first")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--visual-tokens", type=int, nargs="+", default=list(VISUAL_TOKENS))
    parser.add_argument("--layers", type=int, default=FusionConfig().layers)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="weights and activations (bf16 as DeepSpeed's bf16 mode runs them)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error(
            f"need repeats >= 1, warmup >= 0, batch >= 1; got repeats={args.repeats}, "
            f"warmup={args.warmup}, batch={args.batch}"
        )
    if args.layers < 4:
        parser.error(
            f"--layers {args.layers}: the skip pattern (stride 3) needs >= 4 layers "
            "to contain a connected layer"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given, but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    write_json(report, args.output)


if __name__ == "__main__":
    main()
