"""Load test: many concurrent clients on loopback against a real server, with a mix of
classifications (real DDTI PNG uploads), datastore reads and label saves.

    .venv/bin/python bench/load_test.py [--clients 32] [--duration 30] [--max-requests 6000]
                                        [--model M | --url URL [--pid PID]] [--out bench/results/load.json]

Without ``--url`` it starts its own ``monailabel start_server`` (the app, a temporary studies
folder of real DDTI frames, ``--model`` or the shipped model, ``--conf`` settings given with
``--server-conf key=value``). Every client thread sends requests back to back until
``--duration`` seconds have passed or ``--max-requests`` were sent in all; each request has a
``--deadline`` (seconds). A probe asks ``/info`` twice a second meanwhile, and a monitor samples
the resident memory of the server's process tree.

Prints requests/s, median and p99 latency per kind, the status codes, the ``/info`` latency under
load and the peak resident memory, and writes them to ``--out`` (JSON). Exits with 1 when any
request got a 5xx other than a deliberate ``503`` (saturation) answered within ``--busy-deadline``
seconds, or when any request failed or exceeded its deadline (a hang), else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.paths import ddti_subset  # noqa: E402

DEFAULT_MODEL = ROOT / "apps" / "thyroid_nodule" / "model" / "pretrained_classify_nodule.pt"
RESULTS = ROOT / "bench" / "results"
KINDS = ("infer", "read", "save")


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
    return values[k]


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: List[dict] = []
        self.sent = 0

    def take(self, budget: int) -> bool:
        with self.lock:
            if self.sent >= budget:
                return False
            self.sent += 1
            return True

    def add(self, **record) -> None:
        with self.lock:
            self.records.append(record)


def client_loop(k: int, url: str, frames: List[dict], ids: List[str], mix: Dict[str, float], stop_at: float,
                budget: int, deadline: float, rec: Recorder, headers: Dict[str, str]) -> None:
    rng = random.Random(1000 + k)
    session = requests.Session()
    session.headers.update(headers)
    kinds, weights = zip(*mix.items())
    n = 0
    while time.time() < stop_at and rec.take(budget):
        kind = rng.choices(kinds, weights)[0]
        frame = rng.choice(frames)
        t0 = time.perf_counter()
        what = kind
        try:
            if kind == "infer":
                params = {"roi": [40, 40, 260, 260]} if rng.random() < 0.3 else {}
                r = session.post(f"{url}/infer/classify_nodule", params={"output": "json"},
                                 files={"file": ("frame.png", frame["bytes"], "image/png")},
                                 data={"params": json.dumps(params)}, timeout=deadline)
            elif kind == "read":
                image_id = rng.choice(ids)
                choice = rng.randrange(5)
                if choice == 0:
                    what, r = "read:info", session.get(f"{url}/info/", timeout=deadline)
                elif choice == 1:
                    what, r = "read:datastore", session.get(f"{url}/datastore/", params={"output": "all"}, timeout=deadline)
                elif choice == 2:
                    what, r = "read:image_info", session.get(f"{url}/datastore/image/info", params={"image": image_id},
                                                            timeout=deadline)
                elif choice == 3:
                    what, r = "read:image", session.get(f"{url}/datastore/image", params={"image": image_id},
                                                       timeout=deadline)
                else:
                    what, r = "read:label_info", session.get(f"{url}/datastore/label/info",
                                                             params={"label": image_id, "tag": "load"}, timeout=deadline)
            else:
                image_id = rng.choice(ids)
                r = session.put(f"{url}/datastore/label", params={"image": image_id, "tag": "load"},
                                files={"label": ("mask.png", frame["mask"], "image/png")},
                                data={"params": json.dumps({"client": k, "n": n})}, timeout=deadline)
            elapsed = time.perf_counter() - t0
            detail = ""
            if r.status_code >= 400:
                try:
                    detail = str(r.json().get("detail", ""))[:200]
                except ValueError:
                    detail = r.text[:200]
            rec.add(kind=kind, what=what, status=r.status_code, seconds=elapsed, detail=detail, t=time.time())
        except requests.RequestException as e:
            rec.add(kind=kind, what=what, status=None, seconds=time.perf_counter() - t0,
                    detail=f"{type(e).__name__}: {str(e)[:200]}", t=time.time())
        n += 1


def probe_info(url: str, stop_at: float, deadline: float, out: List[float], headers: Dict[str, str]) -> None:
    while time.time() < stop_at:
        t0 = time.perf_counter()
        try:
            r = requests.get(f"{url}/info/", headers=headers, timeout=deadline)
            out.append(time.perf_counter() - t0 if r.status_code == 200 else float("inf"))
        except requests.RequestException:
            out.append(float("inf"))
        time.sleep(0.5)


def monitor_rss(pid: Optional[int], stop: threading.Event, samples: List[int]) -> None:
    while not stop.is_set():
        if pid:
            samples.append(tree_rss(pid))
        stop.wait(0.25)


def summarize(records: List[dict], wall: float, busy_deadline: float) -> dict:
    out: dict = {"kinds": {}}
    for kind in KINDS + ("all",):
        rs = [r for r in records if kind == "all" or r["kind"] == kind]
        ok = [r["seconds"] for r in rs if r["status"] is not None and r["status"] < 400]
        lat = [r["seconds"] for r in rs if r["status"] is not None]
        out["kinds"][kind] = {
            "requests": len(rs),
            "per_s": round(len(rs) / wall, 2) if wall else None,
            "ok": len(ok),
            "median_ms": round(statistics.median(lat) * 1e3, 1) if lat else None,
            "p99_ms": round(percentile(lat, 99) * 1e3, 1) if lat else None,
            "max_ms": round(max(lat) * 1e3, 1) if lat else None,
            "ok_median_ms": round(statistics.median(ok) * 1e3, 1) if ok else None,
            "ok_p99_ms": round(percentile(ok, 99) * 1e3, 1) if ok else None,
            "status": dict(sorted(collections.Counter(str(r["status"]) for r in rs).items())),
        }
    busy = [r for r in records if r["status"] in (429, 503)]
    out["busy"] = {
        "count": len(busy),
        "max_ms": round(max(r["seconds"] for r in busy) * 1e3, 1) if busy else None,
        "p99_ms": round(percentile([r["seconds"] for r in busy], 99) * 1e3, 1) if busy else None,
        "messages": sorted({r["detail"] for r in busy})[:5],
        "all_with_message": all(r["detail"] for r in busy),
        "all_within_deadline": all(r["seconds"] <= busy_deadline for r in busy),
    }
    errors = [r for r in records if r["status"] is None or (r["status"] >= 500 and r["status"] != 503)]
    out["errors"] = {"count": len(errors), "examples": [f"{r['what']}: {r['status']} {r['detail']}" for r in errors[:10]]}
    out["client_errors"] = dict(collections.Counter(f"{r['what']} {r['status']}" for r in records
                                                    if r["status"] is not None and 400 <= r["status"] < 500
                                                    and r["status"] not in (429,)))
    return out


def start_server(args, workdir: Path):
    from tests.support.server import MonaiLabelServer
    from thyroid_plugin.monailabel_adapter import import_collection

    model = Path(args.model)
    if not model.is_file():
        raise SystemExit(f"no model file {model}: give --model (e.g. a trained model.pt) or --url of a running server")
    rows = ddti_subset(args.images // 2, args.images - args.images // 2)
    items = [{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in rows]
    studies = workdir / "studies"
    import_collection(items[::2], studies)
    import_collection(items[1::2], studies, with_diagnosis=False)
    model_dir = workdir / "model"
    model_dir.mkdir()
    shutil.copyfile(model, model_dir / "pretrained_classify_nodule.pt")
    conf = dict(kv.split("=", 1) for kv in args.server_conf)
    server = MonaiLabelServer(studies, model_dir, conf=conf, log_path=workdir / "server.log")
    server.start()
    return server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, help="the running server's process id, for its memory")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model file of the server started here")
    ap.add_argument("--server-conf", nargs="*", default=[], metavar="KEY=VALUE", help="--conf of the server started here")
    ap.add_argument("--images", type=int, default=24, help="DDTI frames in the started server's studies folder")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=6000, help="requests in all, at most")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds a request may take (more = a hang)")
    ap.add_argument("--busy-deadline", type=float, default=2.0, help="seconds a 503/429 'busy' answer may take")
    ap.add_argument("--mix", default="infer=0.5,read=0.35,save=0.15")
    ap.add_argument("--token", help="bearer token (servers with authentication)")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    args = ap.parse_args(argv)
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    assert set(mix) <= set(KINDS), f"--mix kinds are {KINDS}"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    workdir = Path(tempfile.mkdtemp(prefix="load-test-"))
    server = None
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            server = start_server(args, workdir)
            url, pid = server.url, server.process.pid
        objects = requests.get(f"{url}/datastore/", params={"output": "all"}, headers=headers, timeout=60).json()["objects"]
        ids = sorted(objects)
        frames = [{"bytes": Path(r["file"]).read_bytes(), "mask": Path(r["mask"]).read_bytes()}
                  for r in ddti_subset(4, 4, offset=30)]
        requests.post(f"{url}/infer/classify_nodule", params={"output": "json"}, headers=headers,  # warm up
                      files={"file": ("f.png", frames[0]["bytes"])}, timeout=args.deadline)
        rss_start = tree_rss(pid) if pid else None
        load_before = os.getloadavg()
        rec = Recorder()
        info_latency: List[float] = []
        rss: List[int] = []
        stop = threading.Event()
        start = time.time()
        stop_at = start + args.duration
        threads = [threading.Thread(target=client_loop, args=(k, url, frames, ids, mix, stop_at, args.max_requests,
                                                              args.deadline, rec, headers), daemon=True)
                   for k in range(args.clients)]
        probe = threading.Thread(target=probe_info, args=(url, stop_at, args.deadline, info_latency, headers), daemon=True)
        monitor = threading.Thread(target=monitor_rss, args=(pid, stop, rss), daemon=True)
        for t in [monitor, probe, *threads]:
            t.start()
        for t in threads:
            t.join(args.duration + args.deadline + 30)
        hung_threads = sum(t.is_alive() for t in threads)
        wall = time.time() - start
        probe.join(args.deadline + 5)
        stop.set()
        monitor.join(5)
        summary = summarize(rec.records, wall, args.busy_deadline)
        finite_info = [v for v in info_latency if v != float("inf")]
        result = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": [round(v, 2) for v in load_before],
                        "load_average_after": [round(v, 2) for v in os.getloadavg()]},
            "settings": {"clients": args.clients, "duration_s": args.duration, "max_requests": args.max_requests,
                         "deadline_s": args.deadline, "mix": mix, "server_conf": args.server_conf,
                         "url_given": bool(args.url), "model": None if args.url else Path(args.model).name},
            "wall_s": round(wall, 2),
            "requests": len(rec.records),
            "requests_per_s": round(len(rec.records) / wall, 2),
            **summary,
            "info_under_load": {"samples": len(info_latency), "failed": len(info_latency) - len(finite_info),
                                "median_ms": round(statistics.median(finite_info) * 1e3, 1) if finite_info else None,
                                "max_ms": round(max(finite_info) * 1e3, 1) if finite_info else None},
            "rss_mb": {"start": round(rss_start / 2**20) if rss_start else None,
                       "peak": round(max(rss) / 2**20) if rss else None,
                       "end": round(rss[-1] / 2**20) if rss else None},
            "hung_threads": hung_threads,
        }
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{result['requests']} requests in {result['wall_s']} s from {args.clients} clients: "
          f"{result['requests_per_s']} req/s")
    print(f"{'kind':8s} {'n':>6s} {'req/s':>7s} {'median ms':>10s} {'p99 ms':>9s} {'max ms':>9s}  status")
    for kind, k in result["kinds"].items():
        print(f"{kind:8s} {k['requests']:6d} {k['per_s'] or 0:7.1f} {k['median_ms'] or 0:10.1f} {k['p99_ms'] or 0:9.1f} "
              f"{k['max_ms'] or 0:9.1f}  {k['status']}")
    busy = result["busy"]
    print(f"busy answers (503/429): {busy['count']}, slowest {busy['max_ms']} ms, e.g. {busy['messages'][:1]}")
    print(f"/info under load: {result['info_under_load']}")
    print(f"server memory (process tree RSS): {result['rss_mb']} MB")
    print(f"errors (5xx other than 503, failed or timed-out requests): {result['errors']['count']} "
          f"{result['errors']['examples'][:3]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    bad = (result["errors"]["count"] or result["hung_threads"] or not busy["all_with_message"]
           or not busy["all_within_deadline"] or result["info_under_load"]["failed"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
