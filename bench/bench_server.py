"""Server round trip: start-up to the first answered /infer, end-to-end /infer latency on a real
300x300 PNG against the model's own batch-1 time, and the idle server's resident memory.

    .venv/bin/python bench/bench_server.py [--model M] [--requests 30]

Starts a real ``monailabel start_server`` with the app on a free loopback port (a temporary
studies folder with one DDTI frame; the model given, by default the shipped one), then:

1. start-up: from process start to the first successful ``POST /infer/classify_nodule`` (with the
   shipped ``compile: background`` setting the eager network answers while the compiled one is
   built), and to the moment ``/info`` reports the compiled network ready;
2. resident memory (server process and children) when idle after start-up;
3. ``--requests`` sequential ``/infer?output=all`` uploads of a real 300x300 PNG with the
   README's box: median and p90; as many without a box, in alternation, which the shipped nodule
   localiser boxes first (``--localiser``, copied beside the model as shipped; ``none``: without);
4. in this process, the model's batch-1 time through the same ``NodulePredictor`` path, for the
   target "median /infer <= model batch-1 time + 30 ms", timed in alternation with the requests
   (one request, one forward pass) so that the machine's drifting speed affects both alike;
5. the batch route: ``POST /batch/infer/classify_nodule?run_sync=true`` over ``--batch-images``
   real DDTI frames in the datastore (decoding, the network, the masks and the results written
   to the datastore): images per second, against the model's batch-1 rate in the same run.

Prints a table and writes ``bench/results/server.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_MODEL, ddti_images, print_table, write_json  # noqa: E402
from tests.support.server import MonaiLabelServer, parse_multipart  # noqa: E402
from thyroid_plugin.config import load_config  # noqa: E402
from thyroid_plugin.inference import NodulePredictor, preprocess  # noqa: E402
from thyroid_plugin.io import load_image  # noqa: E402
from thyroid_plugin.monailabel_adapter import import_collection  # noqa: E402


#: the box of the README's first request (a user's box around the nodule)
BOX = [40, 40, 260, 260]

def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--batch-images", type=int, default=32)
    ap.add_argument("--localiser", default=str(Path(DEFAULT_MODEL).parent / "pretrained_nodule_localiser.pt"),
                    help="the nodule localiser shipped beside the model (none: without one)")
    args = ap.parse_args()
    frames = ddti_images(args.batch_images)
    image = frames[0]
    png = image.read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        shutil.copyfile(args.model, tmp / "model" / "pretrained_classify_nodule.pt")
        if args.localiser != "none":  # as shipped: frames sent without a box go through it first
            shutil.copyfile(args.localiser, tmp / "model" / "pretrained_nodule_localiser.pt")
        import_collection([{"image": str(f), "label": 0, "group": f.stem} for f in frames], tmp / "studies")
        cfg = load_config("inference")["inference"]
        server = MonaiLabelServer(tmp / "studies", tmp / "model", log_path=tmp / "server.log",
                                  conf={"compile": cfg["compile"], "precision": cfg["precision"]})
        t0 = time.perf_counter()
        server.start()
        while True:
            r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                              files={"file": ("frame.png", png, "image/png")}, timeout=600)
            if r.status_code == 200:
                break
            if r.status_code != 503:
                raise SystemExit(f"/infer failed: {r.status_code} {r.text}")
            time.sleep(0.2)
        startup = time.perf_counter() - t0
        while True:
            model = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["classify_nodule"]["model"]
            if model["compiled"] != "compiling":
                break
            time.sleep(1)
        compiled_after = time.perf_counter() - t0
        compile_status = model["compiled"]
        time.sleep(3)
        idle_rss = rss_mb(server.process.pid)
        predictor = NodulePredictor(args.model, device="cpu", precision=cfg["precision"], compile=cfg["compile"],
                                    compile_batch_sizes=cfg["compile_batch_sizes"])
        predictor.wait_compiled()
        x = preprocess(load_image(image), None, predictor.loaded.transforms).input[None]
        for _ in range(3):
            predictor.forward(x)
        latencies, server_ms, model_times, unboxed = [], [], [], []
        box = json.dumps({"roi": BOX})
        for _ in range(args.requests):  # in alternation: the model alone, a request with a box, one without
            t = time.perf_counter()
            predictor.forward(x)
            model_times.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "all"},
                              files={"file": ("frame.png", png, "image/png")}, data={"params": box}, timeout=600)
            latencies.append((time.perf_counter() - t) * 1e3)
            assert r.status_code == 200, r.text
            server_ms.append(1e3 * parse_multipart(r)[0]["latencies"]["total"])
            t = time.perf_counter()
            r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "all"},
                              files={"file": ("frame.png", png, "image/png")}, timeout=600)
            unboxed.append((time.perf_counter() - t) * 1e3)
            assert r.status_code == 200, r.text
            source = parse_multipart(r)[0]["roi_source"]
        busy_rss = rss_mb(server.process.pid)
        t = time.perf_counter()
        r = requests.post(f"{server.url}/batch/infer/classify_nodule", params={"images": "all", "run_sync": "true"},
                          json={}, timeout=1800)
        batch_s = time.perf_counter() - t
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text
        batch_images = r.json()["total"]
        batch_task_s, batch_phases = r.json()["seconds"], r.json()["phase_seconds"]
        batch_timings = {k: 1e3 * statistics.median(v["timings"][k] for v in r.json()["results"].values())
                         for k in ("preprocess", "network", "postprocess")}
        served = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["classify_nodule"]["model"]
        costs = served.get("compiled_cost_vs_eager")
        server.stop()

    model_ms = statistics.median(model_times)
    median = statistics.median(latencies)
    median_unboxed = statistics.median(unboxed)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    rows = [
        {"measure": "start-up to first /infer answer", "value": startup, "unit": "s", "target": "< 60 s", "ok": startup < 60},
        {"measure": f"start-up to compiled network ready ({compile_status})", "value": compiled_after, "unit": "s"},
        {"measure": "idle server resident memory", "value": idle_rss, "unit": "MiB", "target": "< 2048 MiB", "ok": idle_rss < 2048},
        {"measure": "resident memory after the requests", "value": busy_rss, "unit": "MiB"},
        {"measure": "model batch-1 forward (same run)", "value": model_ms, "unit": "ms"},
        {"measure": f"/infer output=all with a box, median of {args.requests}", "value": median, "unit": "ms",
         "target": f"<= {model_ms + 30:.0f} ms", "ok": median <= model_ms + 30},
        {"measure": "/infer output=all, p90", "value": p90, "unit": "ms"},
        {"measure": "  of which in the server's infer task (median)", "value": statistics.median(server_ms), "unit": "ms"},
        {"measure": f"/infer output=all without a box (roi_source {source}), median", "value": median_unboxed, "unit": "ms"},
        {"measure": f"batch route, {batch_images} datastore images (results saved)", "value": batch_images / batch_s,
         "unit": "images/s"},
        {"measure": "  model batch-1 rate (same run), for comparison", "value": 1e3 / model_ms, "unit": "images/s"},
        *({"measure": f"  {k} per image in the batch (server's timings, median)", "value": v, "unit": "ms"}
          for k, v in batch_timings.items()),
        {"measure": "  the batch task itself (server's clock), per image", "value": 1e3 * batch_task_s / batch_images,
         "unit": "ms"},
        *({"measure": f"    {k} (task phase), per image", "value": 1e3 * v / batch_images, "unit": "ms"}
          for k, v in batch_phases.items()),
    ]
    print_table(rows, ["measure", "value", "unit", "target", "ok"])
    print(f"server's compiled sizes, per-image cost x eager batch 1 at warm-up (these split its batches): {costs}")
    write_json("server", {"model": Path(args.model).name, "startup_s": startup, "compiled_ready_s": compiled_after, "compile_status": compile_status, "idle_rss_mib": idle_rss, "busy_rss_mib": busy_rss,
                          "model_batch1_ms": model_ms, "infer_median_ms": median, "infer_unboxed_median_ms": median_unboxed, "unboxed_roi_source": source, "server_task_median_ms": statistics.median(server_ms), "infer_p90_ms": p90, "latencies_ms": latencies,
                          "batch_route_images": batch_images, "batch_route_images_per_s": batch_images / batch_s,
                          "batch_route_timings_ms": batch_timings, "batch_task_s": batch_task_s,
                          "batch_task_phase_s": batch_phases, "server_compiled_cost_vs_eager": costs,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
