"""Benchmark pac_conv2d (offset-loop autograd function) against pac_conv2d_unfold (F.unfold +
plain autograd): forward+backward wall time and peak memory at a realistic upsampler layer.

    python benchmarks/pac.py [--device cpu|cuda] [--repeats N] [--markdown-out FILE]

Every (variant, layer) runs in a fresh process (multiprocessing "spawn"), so peak memory is
that process's own: on CPU the rise of the resident-set high-water mark
(getrusage ru_maxrss) over its value right after the inputs were allocated; on CUDA
torch.cuda.max_memory_allocated over the memory allocated by the inputs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timings  # noqa: E402

VARIANTS = ("pac_conv2d", "pac_conv2d_unfold")
# (label, B, Ci, Co, Cg, k, padding)
LAYERS = [
    ("B1 Ci4 Co4 Cg3 k3 p1", 1, 4, 4, 3, 3, 1),
    ("B1 Ci16 Co4 Cg3 k3 p1", 1, 16, 4, 3, 3, 1),
]


def _worker(
    variant: str,
    layer: tuple,
    size: tuple[int, int],
    device: str,
    repeats: int,
    warmup: int,
    normalize: bool,
    guide_grad: bool,
    threads: int | None,
    queue,
) -> None:
    """Measure one variant on one layer in this (fresh) process; put a result dict on queue."""
    import torch

    from pipeline.models import pac

    if threads:
        torch.set_num_threads(threads)
    fn = getattr(pac, variant)
    _, B, Ci, Co, Cg, k, padding = layer
    H, W = size
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, Ci, H, W, generator=g).to(dev).requires_grad_(True)
    guide = torch.randn(B, Cg, H, W, generator=g).to(dev).requires_grad_(guide_grad)
    w = (0.1 * torch.randn(Co, Ci, k, k, generator=g)).to(dev).requires_grad_(True)
    b = torch.zeros(Co, device=dev, requires_grad=True)
    grad_out = torch.randn(B, Co, H, W, generator=g).to(dev)
    params = [t for t in (x, guide, w, b) if t.requires_grad]

    def step() -> None:
        for t in params:
            t.grad = None
        out = fn(x, guide, w, b, stride=1, padding=padding, normalize=normalize)
        out.backward(grad_out)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = timings(step, repeats, warmup=warmup, sync=sync)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put(
        {
            "variant": variant,
            "layer": layer[0],
            "ms": 1e3 * statistics.median(times),
            "peak_mib": peak / 2**20,
            "threads": torch.get_num_threads(),
        }
    )


def measure(variant: str, layer: tuple, args) -> dict:
    """Run _worker in a fresh spawned process and return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_worker,
        args=(
            variant,
            layer,
            args.size,
            args.device,
            args.repeats,
            args.warmup,
            args.normalize,
            not args.no_guide_grad,
            args.threads,
            queue,
        ),
    )
    proc.start()
    try:
        result = queue.get(timeout=args.timeout)
    finally:
        proc.join(timeout=60)
    if proc.exitcode not in (0, None):
        raise RuntimeError(f"{variant} on {layer[0]} failed (exit code {proc.exitcode})")
    return result


def table(results: list[dict], args, threads: int) -> str:
    """Markdown table; ratios are this variant over pac_conv2d_unfold on the same layer."""
    H, W = args.size
    where = args.device
    if args.device == "cpu":
        where += f" ({platform.processor() or platform.machine()}, {threads} threads)"
    lines = [
        f"PAC forward+backward, {H}x{W}, device {where}, normalize={args.normalize}, "
        f"guide requires grad={not args.no_guide_grad}, median of {args.repeats} after "
        f"{args.warmup} warm-up",
        "",
        "| variant | shape | fwd+bwd ms | peak MiB | time ratio vs unfold "
        "| memory ratio vs unfold |",
        "|---|---|---:|---:|---:|---:|",
    ]
    base = {r["layer"]: r for r in results if r["variant"] == "pac_conv2d_unfold"}
    for r in results:
        ref = base.get(r["layer"])
        t_ratio = f"{r['ms'] / ref['ms']:.2f}" if ref else "-"
        m_ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref and ref["peak_mib"] > 0 else "-"
        lines.append(
            f"| {r['variant']} | {r['layer']} {H}x{W} | {r['ms']:.1f} | "
            f"{r['peak_mib']:.1f} | {t_ratio} | {m_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--size",
        type=lambda s: tuple(int(v) for v in s.split("x")),
        default=(480, 848),
        help="HxW, default 480x848",
    )
    parser.add_argument("--normalize", action="store_true", help="kernel normalisation on")
    parser.add_argument(
        "--no-guide-grad", action="store_true", help="guide without requires_grad (a raw RGB guide)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument(
        "--markdown-out", type=Path, default=None, help="append the Markdown table to this file"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")

    results = []
    for layer in LAYERS:
        for variant in VARIANTS:
            r = measure(variant, layer, args)
            print(
                f"  {variant:18s} {layer[0]:22s} {r['ms']:9.1f} ms {r['peak_mib']:9.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
            results.append(r)
    md = table(results, args, results[0]["threads"])
    print(md)
    if args.markdown_out is not None:
        with open(args.markdown_out, "a", encoding="utf-8") as fh:
            fh.write("\n" + md)


if __name__ == "__main__":
    main()
