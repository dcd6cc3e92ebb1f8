"""Inference speed of the served path against the machine's limits and the plain eager baseline.

    .venv/bin/python bench/bench_inference.py [--model M] [--precision auto|bf16|fp32] [--compile off|on|background]

Measured in one run:

- two floors: the model's conv+matmul FLOPs per 224x224 image / the measured fp32 matmul rate,
  and / the measured bf16 matmul rate where the CPU (or GPU) has native bf16; the instruction set
  oneDNN uses (from ``ONEDNN_VERBOSE``). The targets are read against the bf16 floor where the
  served precision is bf16, else against the fp32 floor;
- the plain eager fp32 NCHW forward of the same weights (the baseline);
- the served forward (``NodulePredictor.forward`` with the settings of ``configs/inference.json``
  unless overridden) at batch 1, 8 and 32 once its compilations are ready (a batch runs in chunks of
  the compiled size whose image cost least at its warm-up; the table says which), the eager path of the same precision that answers
  while it compiles, and a whole ``predict`` call (decode excluded);
- the compilation time (inductor's disk cache makes a second start faster: run it twice);
- the matmuls, the baseline and the batch-1 paths are timed in alternation (one call of each per
  round), and so are the batch paths, because this machine's speed drifts within minutes;
- agreement of the served precision with fp32 on real DDTI frames: largest class-probability
  difference (must be <= 0.01) and mean absolute saliency difference (must be <= 0.02).

Prints a table and writes ``bench/results/inference.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DEFAULT_MODEL, ddti_images, interleaved_ms, model_gflops, onednn_isa,  # noqa: E402
                          print_table, write_json)
from thyroid_plugin.checkpoint import load_checkpoint, network_from_checkpoint  # noqa: E402
from thyroid_plugin.config import load_config  # noqa: E402
from thyroid_plugin.inference import NodulePredictor, batch_plan, run_network  # noqa: E402
from thyroid_plugin.io import load_image  # noqa: E402
from thyroid_plugin.localiser import NoduleLocaliser  # noqa: E402

PROB_TOL = 0.01
SALIENCY_TOL = 0.02


def matmul_calls(bf16: bool) -> dict:
    """Functions computing a 2048^3 matmul in fp32 and, where the CPU has native bf16, in bf16
    (elsewhere bf16 is emulated, slower than fp32, and gives no floor)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    calls = {"matmul_fp32": lambda: a @ b}
    if bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        calls["matmul_bf16"] = lambda: a16 @ b16
    return calls


MATMUL_FLOPS = 2 * 2048**3


def plan_words(plan) -> str:
    """``compiled 8x1`` / ``compiled 4x8`` / ``eager``: how the served forward splits a batch."""
    sizes = [stop - start for start, stop, runner in plan if runner is not None]
    eager = sum(stop - start for start, stop, runner in plan if runner is None)
    words = [f"compiled {sizes.count(s)}x{s}" for s in sorted(set(sizes), reverse=True)]
    return ", ".join(words + ([f"eager {eager}"] if eager else []))


def agreement_with_fp32(predictor: NodulePredictor, model: str, frames: list) -> dict:
    exact = NodulePredictor(model, device="cpu", precision="fp32", channels_last=False)
    prob_diff, sal_diff = [], []
    for frame in frames:
        a, b = predictor.predict(frame), exact.predict(frame)
        prob_diff.append(abs(a.probabilities["malignant"] - b.probabilities["malignant"]))
        sal_diff.append(float(np.abs(a.saliency - b.saliency).mean()))
    return {"images": len(frames), "max_prob_diff": max(prob_diff), "max_saliency_mad": max(sal_diff),
            "mean_saliency_mad": float(np.mean(sal_diff)),
            "within_tolerance": max(prob_diff) <= PROB_TOL and max(sal_diff) <= SALIENCY_TOL}


def main() -> int:
    cfg = load_config("inference")["inference"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--precision", default=cfg["precision"])
    ap.add_argument("--compile", default=str(cfg["compile"]), choices=["off", "on", "background", "true", "false"])
    ap.add_argument("--images", type=int, default=32, help="real frames for the agreement check")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--localiser", default=str(DEFAULT_MODEL.parent / "pretrained_nodule_localiser.pt"),
                    help="the nodule localiser a frame sent without a box goes through first")
    args = ap.parse_args()

    payload = load_checkpoint(args.model)
    size = int(payload["image_size"])
    reference = network_from_checkpoint(payload)  # fp32, NCHW, eager
    flops = model_gflops(reference, size)
    isa = onednn_isa()
    bf16_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    t0 = time.perf_counter()
    predictor = NodulePredictor(args.model, device="cpu", precision=args.precision, compile=args.compile,
                                compile_batch_sizes=cfg["compile_batch_sizes"], channels_last=bool(cfg["channels_last"]))
    status = predictor.wait_compiled()
    compile_s = time.perf_counter() - t0
    loaded = predictor.loaded
    precision = predictor.info()["precision"]
    kind = f"{precision}, channels-last"

    def eager_forward(batch: torch.Tensor):  # the served settings without the compiled networks
        return run_network(loaded.network, batch.contiguous(memory_format=torch.channels_last), predictor.device, loaded.dtype)

    def baseline_forward(batch: torch.Tensor):
        with torch.inference_mode():
            return reference(batch)

    matmuls = matmul_calls(bf16_native)
    x = {n: torch.rand(n, 3, size, size) for n in (1, 8, 32)}
    ms = interleaved_ms({**matmuls, "baseline": lambda: baseline_forward(x[1]), "eager1": lambda: eager_forward(x[1]),
                         "served1": lambda: predictor.forward(x[1])}, repeat=args.repeat)
    msb = interleaved_ms({"served8": lambda: predictor.forward(x[8]), "served32": lambda: predictor.forward(x[32]),
                          "eager8": lambda: eager_forward(x[8]), "eager32": lambda: eager_forward(x[32])},
                         repeat=max(3, args.repeat // 4), warmup=1)
    rate32 = MATMUL_FLOPS / (ms["matmul_fp32"] / 1e3) / 1e9
    rate16 = MATMUL_FLOPS / (ms["matmul_bf16"] / 1e3) / 1e9 if bf16_native else None
    floor32 = flops / rate32 * 1e3
    floor16 = flops / rate16 * 1e3 if bf16_native else None
    yard, yard_name = (floor16, "bf16 floor") if (precision == "bfloat16" and floor16) else (floor32, "fp32 floor")
    baseline = ms["baseline"]
    print(f"model {Path(args.model).name}: {flops:.2f} GFLOPs per {size}x{size} image; oneDNN ISA: {isa}; native bf16: {bf16_native}")
    print(f"fp32 matmul {rate32:.0f} GFLOP/s -> floor {floor32:.1f} ms; "
          + (f"bf16 matmul {rate16:.0f} GFLOP/s -> floor {floor16:.1f} ms" if floor16 else "no bf16 floor (no native bf16)"))
    rows = [{"path": "floor fp32 (FLOPs / fp32 matmul rate)", "batch": 1, "ms_per_image": floor32},
            {"path": "floor bf16 (FLOPs / bf16 matmul rate)", "batch": 1, "ms_per_image": floor16},
            {"path": "baseline: eager fp32 NCHW", "batch": 1, "ms_per_image": baseline}]
    for n in (1, 8, 32):
        per = ms["eager1"] if n == 1 else msb[f"eager{n}"] / n
        rows.append({"path": f"eager {kind} (answers while compiling)", "batch": n, "ms_per_image": per})
    ready = predictor.info()["compiled_batch_sizes"]
    served = {1: ms["served1"], 8: msb["served8"] / 8, 32: msb["served32"] / 32}
    for n, per in served.items():
        how = plan_words(batch_plan(n, loaded.compiled))
        rows.append({"path": f"served forward ({kind}, {how})", "batch": n, "ms_per_image": per})
    frames = [load_image(p) for p in ddti_images(args.images)]
    localiser = NoduleLocaliser.load(args.localiser)
    pixels = frames[0].array
    both = interleaved_ms({"predict": lambda: predictor.predict(frames[0]), "localise": lambda: localiser.boxes([pixels])},
                          repeat=args.repeat)
    whole = both["predict"]
    rows.append({"path": "served predict() incl. pre/post-processing", "batch": 1, "ms_per_image": whole})
    rows.append({"path": "nodule localiser (added for a frame sent without a box)", "batch": 1,
                 "ms_per_image": both["localise"]})
    for r in rows:
        if r["ms_per_image"] is not None:
            r["x_yardstick"] = r["ms_per_image"] / yard
            r["speedup_vs_baseline"] = baseline / r["ms_per_image"]
    agreement = agreement_with_fp32(predictor, args.model, frames)

    print_table(rows, ["path", "batch", "ms_per_image", "x_yardstick", "speedup_vs_baseline"])
    print(f"(x_yardstick: times the {yard_name}, {yard:.1f} ms)")
    print(f"\nmodel load + compilation ({predictor.compile}, batch sizes {list(predictor.compile_batch_sizes)}): "
          f"{compile_s:.1f} s, status {status}; per image at warm-up (ms): {predictor.info()['compiled_ms_per_image']}, "
          f"x eager batch 1: {predictor.info()['compiled_cost_vs_eager']} (these choose the split)")
    print(f"agreement with fp32 on {len(frames)} DDTI frames: max |dP| {agreement['max_prob_diff']:.4f} (<= {PROB_TOL}), "
          f"max saliency MAD {agreement['max_saliency_mad']:.4f} (<= {SALIENCY_TOL}) -> "
          f"{'OK' if agreement['within_tolerance'] else 'OUT OF TOLERANCE'}")
    batch_worst = max(served[8], served[32])
    targets = {
        "yardstick": yard_name,
        "batch1_x_yardstick": served[1] / yard, "batch1_ok": served[1] <= 4.0 * yard,
        "speedup_vs_eager_fp32": baseline / served[1], "speedup_ok": baseline / served[1] >= 2.5,
        "batch_x_yardstick": batch_worst / yard, "batch_ok": batch_worst <= 3.5 * yard and batch_worst <= served[1],
    }
    print(f"nodule localiser: {both['localise']:.1f} ms per frame, {both['localise'] / whole:.2f} x a served predict()")
    print("targets:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in targets.items()})
    write_json("inference", {"model": Path(args.model).name, "image_size": size, "gflops": flops, "onednn_isa": isa,
                             "bf16_native": bf16_native, "matmul_gflops": {"fp32": rate32, "bf16": rate16},
                             "floor_ms": {"fp32": floor32, "bf16": floor16}, "baseline_ms": baseline, "served_ms": served,
                             "eager_ms": {1: ms["eager1"], 8: msb["eager8"] / 8, 32: msb["eager32"] / 32},
                             "predict_ms": whole, "localiser_ms": both["localise"],
                             "localiser_x_predict": both["localise"] / whole, "load_and_compile_s": compile_s, "compile_status": status,
                             "compiled_batch_sizes": ready, "compiled_cost_vs_eager": predictor.info()["compiled_cost_vs_eager"],
                             "plans": {n: plan_words(batch_plan(n, loaded.compiled)) for n in (1, 8, 32)},
                             "precision": precision, "compile": predictor.compile,
                             "agreement": agreement, "targets": targets, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
