"""Training speed and memory, measured side by side in one run.

    .venv/bin/python bench/bench_training.py [--images 64] [--batch 16] [--size 224] [--steps 8]

On the same real DDTI images, batch and transforms:

1. a bare PyTorch loop, eager fp32 NCHW (the reference);
2. a bare PyTorch loop with the optimised settings of ``configs/train.json`` (channels-last,
   bf16 autocast where the CPU has it, ``torch.compile`` with ``--compile``);
3. the ignite engine (:func:`thyroid_plugin.engine.fit` with all its handlers) on the optimised
   settings: its step time must be within 1.1x of (2);
4. the data loader alone (decode + transforms, images/s) against the model's training images/s;
5. peak resident memory of a batch-16 training step at 224x224, each setting in a fresh process.

Prints a table and writes ``bench/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ddti_images, print_table, write_json  # noqa: E402
from thyroid_plugin.config import load_config  # noqa: E402
from thyroid_plugin.engine import TrainSettings, amp_dtype, fit, make_loader, make_train_step  # noqa: E402
from thyroid_plugin.losses import SaliencyGuidedLoss  # noqa: E402
from thyroid_plugin.networks import SaliencyGuidedClassifier  # noqa: E402
from thyroid_plugin.transforms import augmentation_transforms, preprocess_transforms  # noqa: E402


def datalist(n: int) -> list[dict]:
    return [{"image": str(p), "label": i % 2, "group": str(i)} for i, p in enumerate(ddti_images(n))]


def settings_for(optimised: bool, args) -> TrainSettings:
    cfg = load_config("train")["training"]
    base = {k: v for k, v in cfg.items() if k in TrainSettings.__dataclass_fields__}
    base.update(batch_size=args.batch, image_size=args.size, progress=False, tensorboard=False, log_every=0,
                epochs=1, early_stop_patience=0)
    if not optimised:
        base.update(amp="off", channels_last=False, compile=False)
    else:
        base.update(compile=args.compile)
    return TrainSettings(**base)


def bare_loop_ms(items, settings: TrainSettings, steps: int) -> float:
    """Median ms per step of a plain loop over the same loader (after warm-up steps)."""
    torch.manual_seed(0)
    network = SaliencyGuidedClassifier()
    if settings.channels_last:
        network = network.to(memory_format=torch.channels_last)
    runner = torch.compile(network) if settings.compile else network
    loss = load_config("train").get_parsed_content("loss")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = make_train_step(runner, network, loss, optimizer, scaler, torch.device("cpu"), settings)
    tf = preprocess_transforms(settings.image_size) + augmentation_transforms(settings.image_size, settings.augmentation)
    _, loader = make_loader(items, tf, settings, settings.batch_size, shuffle=True)
    times = []
    while len(times) < steps + 2:
        t = time.perf_counter()
        for batch in loader:  # timed from asking for the batch to the end of the step, as the engine is
            step(None, batch)
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if len(times) >= steps + 2:
                break
    times = sorted(times[2:])
    return times[len(times) // 2] * 1e3


def engine_ms(items, settings: TrainSettings, steps: int) -> float:
    """Per-step ms of :func:`fit` (all handlers) over ``steps`` steps, first epoch excluded."""
    torch.manual_seed(0)
    network = SaliencyGuidedClassifier()
    loss = load_config("train").get_parsed_content("loss")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    per_epoch = max(1, len(items) // settings.batch_size)
    settings.epochs = 1 + max(1, steps // per_epoch)
    with tempfile.TemporaryDirectory() as out:
        stats = fit(network, loss, optimizer, items, [], out, settings, device="cpu")
    epochs = stats["history"][1:]  # the first epoch includes warm-up (and compilation)
    return sum(e["time_s"] for e in epochs) / (len(epochs) * per_epoch) * 1e3


def loader_images_per_s(items, settings: TrainSettings) -> dict:
    tf = preprocess_transforms(settings.image_size) + augmentation_transforms(settings.image_size, settings.augmentation)
    t = time.perf_counter()
    _, loader = make_loader(items, tf, settings, settings.batch_size, shuffle=True)
    cache_s = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    epoch_s = time.perf_counter() - t
    return {"decode_resize_images_per_s": len(items) / cache_s, "augment_images_per_s": n / epoch_s}


def peak_memory_child(optimised: bool, batch: int, size: int) -> None:
    """Run in a subprocess: a few training steps, then print the peak RSS in MiB."""
    torch.manual_seed(0)
    settings = settings_for(optimised, argparse.Namespace(batch=batch, size=size, compile=False))
    network = SaliencyGuidedClassifier()
    if settings.channels_last:
        network = network.to(memory_format=torch.channels_last)
    loss = SaliencyGuidedLoss("wellposed", class_weights="balanced")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    step = make_train_step(network, network, loss, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                           torch.device("cpu"), settings)
    x = {"image": torch.rand(batch, 3, size, size), "label": torch.randint(0, 2, (batch,))}
    for _ in range(3):
        step(None, x)
    # VmHWM is this process image's own high-water mark; ru_maxrss would also count the parent's
    # resident set at fork time (Linux keeps it across exec)
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the optimised loop")
    ap.add_argument("--peak-memory-child", choices=["eager", "optimised"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child == "optimised", args.batch, args.size)
        return 0

    items = datalist(args.images)
    eager = settings_for(False, args)
    optimised = settings_for(True, args)
    eager_ms = bare_loop_ms(items, eager, args.steps)
    opt_ms = bare_loop_ms(items, optimised, args.steps)
    ignite_ms = engine_ms(items, settings_for(True, args), args.steps)
    loader = loader_images_per_s(items, optimised)
    memory = {}
    for mode in ("eager", "optimised"):
        out = subprocess.run([sys.executable, __file__, "--peak-memory-child", mode, "--batch", str(args.batch), "--size", str(args.size)],
                             capture_output=True, text=True, cwd=ROOT, timeout=1800)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    model_images_per_s = args.batch / (opt_ms / 1e3)
    rows = [
        {"measure": "bare loop, eager fp32 NCHW", "ms_per_step": eager_ms, "images_per_s": args.batch / (eager_ms / 1e3)},
        {"measure": f"bare loop, optimised ({str(amp_dtype(torch.device('cpu'), optimised.amp)).replace('torch.', '')}, channels-last{', compiled' if args.compile else ''})",
         "ms_per_step": opt_ms, "images_per_s": model_images_per_s, "vs_eager": eager_ms / opt_ms},
        {"measure": "ignite engine (fit, all handlers), optimised", "ms_per_step": ignite_ms,
         "images_per_s": args.batch / (ignite_ms / 1e3), "vs_bare": ignite_ms / opt_ms},
        {"measure": "loader: decode + resize (once, cached)", "images_per_s": loader["decode_resize_images_per_s"]},
        {"measure": "loader: augmentation per epoch", "images_per_s": loader["augment_images_per_s"]},
        {"measure": f"peak RSS, batch {args.batch} at {args.size}, eager fp32", "MiB": memory["eager"]},
        {"measure": f"peak RSS, batch {args.batch} at {args.size}, optimised", "MiB": memory["optimised"]},
    ]
    print_table(rows, ["measure", "ms_per_step", "images_per_s", "vs_eager", "vs_bare", "MiB"])
    targets = {
        "engine_vs_bare": ignite_ms / opt_ms, "engine_ok": ignite_ms <= 1.1 * opt_ms,
        "optimised_speedup": eager_ms / opt_ms, "speedup_ok": eager_ms / opt_ms >= 1.5,
        "peak_rss_mib": max(memory.values()), "memory_ok": max(memory.values()) < 12 * 1024,
        "loader_faster_than_model": loader["augment_images_per_s"] > model_images_per_s,
    }
    print("targets:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in targets.items()})
    write_json("training", {"batch": args.batch, "image_size": args.size, "images": args.images, "eager_ms": eager_ms,
                            "optimised_ms": opt_ms, "engine_ms": ignite_ms, "loader": loader, "peak_rss_mib": memory,
                            "targets": targets, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
