"""Classification by archive id against the same frame uploaded directly, in one run.

    .venv/bin/python bench/bench_pacs.py [--model M] [--frames 15]

Starts a real Orthanc with its DICOMweb plugin (``scripts/setup_pacs.sh`` installs it) and a
real ``monailabel start_server`` on it (``--studies`` = the DICOMweb root; ``compile off`` so that
every path runs the same network), stores ``--frames`` realistic ultrasound instances (RGB,
JPEG baseline, Sequence of Ultrasound Regions) built from distinct DDTI frames, then for each
frame, in alternation:

1. ``archive, first time``: ``POST /infer/classify_nodule?image=<SOP UID>`` with an empty cache
   for that frame (the server fetches the instance over WADO-RS, caches it, classifies it);
2. ``archive, cached``: the same request again (served from the local cache);
3. ``upload``: the same DICOM instance uploaded as ``file``.

Prints the medians and the ratios to the upload and writes ``bench/results/pacs.json``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_MODEL, ddti_images, print_table, write_json  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.server import MonaiLabelServer  # noqa: E402
from tests.support.us_dicom import Study, rgb_frame, us_dataset  # noqa: E402


def timed_post(url: str, **kwargs) -> float:
    start = time.perf_counter()
    r = requests.post(url, timeout=120, **kwargs)
    elapsed = (time.perf_counter() - start) * 1e3
    if r.status_code != 200:
        raise SystemExit(f"{url} answered {r.status_code}: {r.text[:300]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--frames", type=int, default=15)
    args = ap.parse_args()
    from dicomweb_client.api import DICOMwebClient
    from pydicom.uid import generate_uid

    root = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    try:
        study = Study("BENCH-1", "Bench^Patient")
        series = generate_uid()
        datasets = [us_dataset(study, series, [rgb_frame(p)], n + 1, jpeg=True)
                    for n, p in enumerate(ddti_images(args.frames + 1))]
        uploads = []
        for ds in datasets:
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, write_like_original=False)
            uploads.append(buf.getvalue())
        model_dir = root / "model"
        model_dir.mkdir()
        shutil.copyfile(args.model, model_dir / "pretrained_classify_nodule.pt")
        with OrthancServer(root / "orthanc") as orthanc:
            DICOMwebClient(orthanc.dicomweb).store_instances(datasets)
            server = MonaiLabelServer(root, model_dir, conf={"archive_cache": str(root / "cache")},
                                      log_path=root / "server.log")
            server.studies = orthanc.dicomweb
            with server:
                infer = f"{server.url}/infer/classify_nodule"
                # warm-up: model loaded, first request paths exercised (frame 0 is not measured)
                timed_post(infer, params={"image": datasets[0].SOPInstanceUID, "output": "json"})
                timed_post(infer, params={"output": "json"}, files={"file": ("f.dcm", uploads[0], "application/dicom")})
                times: dict = {"archive, first time": [], "archive, cached": [], "upload": []}
                for ds, data in zip(datasets[1:], uploads[1:]):
                    query = {"image": ds.SOPInstanceUID, "output": "json"}
                    times["archive, first time"].append(timed_post(infer, params=query))
                    times["archive, cached"].append(timed_post(infer, params=query))
                    times["upload"].append(timed_post(infer, params={"output": "json"},
                                                      files={"file": ("f.dcm", data, "application/dicom")}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"path": k, "median ms": medians[k], "p90 ms": sorted(v)[int(0.9 * (len(v) - 1))],
             "x upload": medians[k] / medians["upload"]} for k, v in times.items()]
    print(f"{args.frames} frames, 300x300 RGB JPEG baseline, shipped settings but compile off")
    print_table(rows, ["path", "median ms", "p90 ms", "x upload"])
    write_json("pacs", {"frames": args.frames, "model": str(args.model), "rows": rows, "samples_ms": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
