"""t2r's int4 kernel against PyTorch's, on every int4 projection of a real converted model at batch 1.

    python scripts/int4_kernel_speed.py [MODEL] [--rounds 5] [--threads 2]

MODEL: a converted folder or a ready model's name (default: t2r-smollm2-135m). Its projections are
stacked (q/k/v and gate/up as one matrix each, as `t2r generate` decodes) and quantised to int4;
one "token" is one batch-1 product through every one of them, in model order: t2r's kernel
(`torch.ops.t2r_int4.int4_matmul`, fp32 in, int8 activations) and PyTorch's
`_weight_int4pack_mm_for_cpu` on the same 4-bit codes (bf16 activations, its own packed layout), in
interleaved rounds (A B A B ...), medians with min-max. Bytes per token are each kernel's own
weight bytes; the bound is those bytes over the measured read bandwidth. Nothing but the products:
no attention, norms or Python of the model step. Writes benchmarks/int4_kernel_speed.json and the
BENCHMARKS.md section "int4-kernel".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.bench.memory import memory_bandwidth  # noqa: E402
from t2r.evaluation.markdown import replace_section  # noqa: E402
from t2r.hub import load_converted, ready_model_folder  # noqa: E402
from t2r.modeling.fused import fuse_projections  # noqa: E402
from t2r.modeling.quantize import Int4Linear, with_weights  # noqa: E402
from t2r.ops.int4_matmul import kernel_available, unpacked_codes  # noqa: E402


def torch_int4(layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 4-bit codes in PyTorch's layout: packed codes and [groups, out, 2] bf16 scale, zero."""
    codes = unpacked_codes(layer.weight_int4).reshape(layer.out_features, -1).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    d, m = layer.steps.float(), layer.minimums.float()
    scales_and_zeros = torch.stack([d.T, (m + 8 * d).T], -1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="t2r-smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per timed block")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernel_available():
        raise SystemExit("t2r: the int4 kernel could not be built here")
    folder = Path(args.model) if Path(args.model).is_dir() else ready_model_folder(args.model)
    model, _ = load_converted(folder)
    fuse_projections(model)
    layers = [m for m in with_weights(model, "int4").modules() if isinstance(m, Int4Linear)]
    theirs = [torch_int4(layer) for layer in layers]
    inputs = [torch.randn(1, layer.in_features) for layer in layers]
    inputs_bf16 = [x.to(torch.bfloat16) for x in inputs]

    def t2r_kernel() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            torch.ops.t2r_int4.int4_matmul(x, layer.codes, layer.steps, layer.minimums)

    def pytorch_kernel() -> None:
        for (packed, scales), x in zip(theirs, inputs_bf16, strict=True):
            torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales)

    engines = {"t2r int4 kernel": t2r_kernel, "PyTorch _weight_int4pack_mm_for_cpu": pytorch_kernel}
    weight_bytes = {
        "t2r int4 kernel": sum(layer.codes.nbytes + layer.steps.nbytes + layer.minimums.nbytes for layer in layers),
        "PyTorch _weight_int4pack_mm_for_cpu": sum(p.nbytes + s.nbytes for p, s in theirs),
    }
    bandwidth = memory_bandwidth()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for run in engines.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            for _ in range(args.tokens):
                run()
            times[name].append((time.perf_counter() - start) / args.tokens)
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        bound = weight_bytes[name] / bandwidth
        rows.append(
            {
                "kernel": name,
                "ms_per_token": median * 1e3,
                "min_ms": min(seconds) * 1e3,
                "max_ms": max(seconds) * 1e3,
                "weight_mb": weight_bytes[name] / 1e6,
                "of_bound": bound / median,
            }
        )
    record = {
        "model": str(args.model),
        "projections": len(layers),
        "threads": args.threads,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "bandwidth_gb_s": bandwidth / 1e9,
        "torch": torch.__version__,
        "rows": rows,
        "speedup": rows[1]["ms_per_token"] / rows[0]["ms_per_token"],
    }
    (ROOT / "benchmarks" / "int4_kernel_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    command = f"python scripts/int4_kernel_speed.py {args.model} --rounds {args.rounds} --threads {args.threads}"
    lines = [
        f"`{command}` — the {len(layers)} int4 projections of the model (q/k/v and gate/up stacked), "
        f"one batch-1 product through each per token, {args.threads} threads, interleaved rounds; read "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| kernel | ms per token, median (min-max) | weight MB | of the bandwidth bound |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kernel']} | {row['ms_per_token']:.2f} ({row['min_ms']:.2f}-{row['max_ms']:.2f}) "
            f"| {row['weight_mb']:.1f} | {row['of_bound']:.2f} |"
        )
    lines += ["", f"- t2r's kernel: **{record['speedup']:.2f}x** PyTorch's on the same codes."]
    replace_section(ROOT / "BENCHMARKS.md", "int4-kernel", "\n".join(lines), "The int4 kernel")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
