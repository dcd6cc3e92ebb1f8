"""Shared pieces of the benchmarks: the machine's fp32 matmul rate, the model's FLOPs, timing,
tables and JSON output. Every figure a benchmark reports is measured in the same run as the
reference it is compared with (these machines are noisy)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = ROOT / "apps" / "thyroid_nodule" / "model" / "pretrained_classify_nodule.pt"
DDTI = ROOT.parent / "shared" / "data" / "ddti"


def median_ms(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: dict, repeat: int = 20, warmup: int = 2) -> dict:
    """Median wall time (ms) of each ``name -> fn`` measured in alternation (one call of each per
    round), so that the machine's drifting speed (shared, throttled CPUs) affects all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def matmul_gflops(size: int = 2048, repeat: int = 10) -> float:
    """Measured fp32 dense matrix multiply rate (GFLOP/s) on the current device (CPU here)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    ms = median_ms(lambda: a @ b, repeat=repeat, warmup=2)
    return 2 * size**3 / (ms / 1e3) / 1e9


def model_gflops(network: torch.nn.Module, image_size: int = 224) -> float:
    """Convolution and matrix-multiply GFLOPs of one ``image_size`` square image."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(x)
    return counter.get_total_flops() / 1e9


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to on this CPU (its ``ONEDNN_VERBOSE`` info line,
    read from a child process that runs one channels-last convolution)."""
    import subprocess
    import sys

    code = ("import torch; c = torch.nn.Conv2d(32, 32, 3).to(memory_format=torch.channels_last)\n"
            "with torch.inference_mode(): c(torch.rand(1, 32, 64, 64).contiguous(memory_format=torch.channels_last))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"})
    for line in (out.stdout + out.stderr).splitlines():
        if ",info,cpu,isa:" in line:
            return line.split("isa:", 1)[1].strip()
    return "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC`` or ``Intel Xeon ...``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten {path.relative_to(ROOT)}")
    return path


def ddti_images(n: int) -> list[Path]:
    """``n`` real DDTI frames (sorted, deterministic)."""
    files = sorted((DDTI / "images").glob("*.png"))
    if not files:
        raise SystemExit(f"no DDTI images under {DDTI}")
    return files[:n]
