"""Inference speed of the served path against the machine's floor and the plain eager baseline.

    .venv/bin/python bench/bench_inference.py [--model M] [--precision auto|bf16|fp32] [--compile off|on|background]

Measured in one run:

- the floor: the model's conv+matmul FLOPs per 224x224 image / the measured fp32 matmul rate;
- the plain eager fp32 NCHW forward of the same weights (the baseline);
- the served forward (``NodulePredictor.forward`` with the settings of ``configs/inference.json``
  unless overridden) at batch 1 once its compilation is ready (and the eager path that answers
  while it compiles), at batch 8/32, and a whole ``predict`` call (decode excluded);
- the compilation time (inductor's disk cache makes a second start faster: run it twice);
- the matmul, the baseline and the batch-1 paths are timed in alternation (one call of each per
  round), because this machine's speed drifts by tens of percent within minutes;
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

from bench.common import DEFAULT_MODEL, ddti_images, interleaved_ms, median_ms, model_gflops, print_table, write_json  # noqa: E402
from thyroid_plugin.checkpoint import load_checkpoint, network_from_checkpoint  # noqa: E402
from thyroid_plugin.config import load_config  # noqa: E402
from thyroid_plugin.inference import NodulePredictor  # noqa: E402
from thyroid_plugin.io import load_image  # noqa: E402

PROB_TOL = 0.01
SALIENCY_TOL = 0.02


def main() -> int:
    cfg = load_config("inference")["inference"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--precision", default=cfg["precision"])
    ap.add_argument("--compile", default=str(cfg["compile"]), choices=["off", "on", "background", "true", "false"])
    ap.add_argument("--images", type=int, default=32, help="real frames for the agreement check")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    payload = load_checkpoint(args.model)
    size = int(payload["image_size"])
    reference = network_from_checkpoint(payload)  # fp32, NCHW, eager
    flops = model_gflops(reference, size)

    t0 = time.perf_counter()
    predictor = NodulePredictor(args.model, device="cpu", precision=args.precision, compile=args.compile,
                                channels_last=bool(cfg["channels_last"]))
    status = predictor.wait_compiled()
    compile_s = time.perf_counter() - t0
    state = predictor._state
    kind = f"{predictor.info()['precision']}, channels-last"

    def eager_forward(batch: torch.Tensor):  # the served settings without the compiled network
        return predictor._run(state["network"], state["dtype"], batch.contiguous(memory_format=torch.channels_last))

    def baseline_forward(batch: torch.Tensor):
        with torch.inference_mode():
            return reference(batch)

    # the floor, the baseline and the served paths measured in alternation (this machine's speed
    # drifts by tens of percent within minutes)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x1 = torch.rand(1, 3, size, size)
    x8, x32 = torch.rand(8, 3, size, size), torch.rand(32, 3, size, size)
    ms = interleaved_ms({"matmul": lambda: a @ b, "baseline": lambda: baseline_forward(x1), "eager": lambda: eager_forward(x1),
                         "served1": lambda: predictor.forward(x1)}, repeat=args.repeat)
    ms8 = interleaved_ms({"served8": lambda: predictor.forward(x8), "served32": lambda: predictor.forward(x32)},
                         repeat=max(3, args.repeat // 4), warmup=1)
    rate = 2 * 2048**3 / (ms["matmul"] / 1e3) / 1e9
    floor = flops / rate * 1e3
    baseline = ms["baseline"]
    print(f"model {Path(args.model).name}: {flops:.2f} GFLOPs per {size}x{size} image; fp32 matmul {rate:.0f} GFLOP/s; floor {floor:.1f} ms")
    rows = [{"path": "floor (FLOPs / matmul rate)", "batch": 1, "ms_per_image": floor, "x_floor": 1.0},
            {"path": "baseline: eager fp32 NCHW", "batch": 1, "ms_per_image": baseline, "x_floor": baseline / floor},
            {"path": f"eager {kind} (answers while compiling)", "batch": 1, "ms_per_image": ms["eager"],
             "x_floor": ms["eager"] / floor, "speedup_vs_baseline": baseline / ms["eager"]}]
    served = {1: ms["served1"], 8: ms8["served8"] / 8, 32: ms8["served32"] / 32}
    for batch, per_image in served.items():
        compiled = (batch, 3, size, size) in state["compiled"]
        rows.append({"path": f"served forward ({kind}{', compiled' if compiled else ', eager'})", "batch": batch,
                     "ms_per_image": per_image, "x_floor": per_image / floor, "speedup_vs_baseline": baseline / per_image})
    eager1 = ms["eager"]

    frames = [load_image(p) for p in ddti_images(args.images)]
    whole = median_ms(lambda: predictor.predict(frames[0]), repeat=args.repeat)
    rows.append({"path": "served predict() incl. pre/post-processing", "batch": 1, "ms_per_image": whole, "x_floor": whole / floor})

    exact = NodulePredictor(args.model, device="cpu", precision="fp32", channels_last=False)
    prob_diff, sal_diff = [], []
    for frame in frames:
        a, b = predictor.predict(frame), exact.predict(frame)
        prob_diff.append(abs(a.probabilities["malignant"] - b.probabilities["malignant"]))
        sal_diff.append(float(np.abs(a.saliency - b.saliency).mean()))
    agreement = {"images": len(frames), "max_prob_diff": max(prob_diff), "max_saliency_mad": max(sal_diff),
                 "mean_saliency_mad": float(np.mean(sal_diff)),
                 "within_tolerance": max(prob_diff) <= PROB_TOL and max(sal_diff) <= SALIENCY_TOL}

    print_table(rows, ["path", "batch", "ms_per_image", "x_floor", "speedup_vs_baseline"])
    print(f"\nmodel load + compilation ({predictor.compile}): {compile_s:.1f} s, status {status}")
    print(f"agreement with fp32 on {len(frames)} DDTI frames: max |dP| {agreement['max_prob_diff']:.4f} (<= {PROB_TOL}), "
          f"max saliency MAD {agreement['max_saliency_mad']:.4f} (<= {SALIENCY_TOL}) -> "
          f"{'OK' if agreement['within_tolerance'] else 'OUT OF TOLERANCE'}")
    targets = {
        "batch1_x_floor": served[1] / floor, "batch1_x_floor_ok": served[1] <= 1.3 * floor,
        "speedup_vs_eager": baseline / served[1], "speedup_ok": baseline / served[1] >= 2.5,
        "batch_x_floor": min(served[8], served[32]) / floor, "batch_x_floor_ok": min(served[8], served[32]) <= 1.3 * floor,
    }
    print("targets:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in targets.items()})
    write_json("inference", {"model": Path(args.model).name, "image_size": size, "gflops": flops, "matmul_gflops": rate,
                             "floor_ms": floor, "baseline_ms": baseline, "served_ms": served, "predict_ms": whole,
                             "load_and_compile_s": compile_s, "compile_status": status, "eager_batch1_ms": eager1,
                             "precision": predictor.info()["precision"], "compile": predictor.compile,
                             "agreement": agreement, "targets": targets, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
