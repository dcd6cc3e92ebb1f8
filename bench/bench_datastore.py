"""Saving batch results in the studies datastore: one label at a time against a chunk at once.

    .venv/bin/python bench/bench_datastore.py [--images 456] [--chunk 8] [--rounds 6]

Builds a studies folder of ``--images`` real DDTI frames (``ConfirmedCasesDatastore``, the
server's datastore), gives each a stored result (a label with a result JSON, as batch inference
leaves it), then, in alternation, saves the saliency masks and results of ``--chunk`` frames

1. ``one by one``: ``save_label`` per frame (each label file and the datastore file written
   atomically and durably, the whole datastore file rewritten per label);
2. ``chunk``: ``save_labels`` of the chunk (the batch route's path: every file staged and
   flushed, one datastore write, then the renames),

and reports ms per label and the ratio. It also times one serialisation of the datastore file
as MONAI Label writes it (``json.dumps`` with an indent) against the one used here (pydantic's).
Writes ``bench/results/datastore.json``.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ddti_images, median_ms, print_table, write_json  # noqa: E402
from thyroid_plugin.io import encode_mask, load_image, mask_suffix, transient_file  # noqa: E402
from thyroid_plugin.monailabel_adapter.datastore import ConfirmedCasesDatastore, _datastore_json  # noqa: E402


def result_info(probability: float) -> dict:
    """A label info the size of a served result (the fields of the README's result JSON)."""
    return {"model": "classify_nodule", "params": {
        "label": "malignant" if probability >= 0.5 else "benign", "probability": probability,
        "probabilities": {"benign": 1 - probability, "malignant": probability}, "threshold": 0.5,
        "roi": [10, 12, 200, 180], "model": "sha256:0123456789abcdef", "warnings": [],
        "saliency": {"mask_threshold": 0.5, "area_fraction": 0.21},
        "image": {"size": [300, 300], "spacing": [1.0, 1.0], "origin": [0.0, 0.0],
                  "direction": [[1.0, 0.0], [0.0, 1.0]], "format": "png", "mask_format": "png"},
        "timings": {"preprocess_s": 0.004, "network_s": 0.1, "postprocess_s": 0.002}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=456, help="DDTI frames in the folder (default: all 456)")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    files = ddti_images(args.images)
    root = Path(tempfile.mkdtemp(prefix="bench-datastore-"))
    rng = np.random.default_rng(0)
    try:
        store = ConfirmedCasesDatastore(str(root))
        t = time.perf_counter()
        for f in files:
            store.add_image(f.stem, str(f), {})
        ids = sorted(store.list_images())
        masks = {}
        for image_id in ids:
            image = load_image(store.get_image_uri(image_id))
            saliency = (rng.random(image.shape[:2]) > 0.5).astype(np.uint8) * 255
            masks[image_id] = transient_file(encode_mask(image, saliency), mask_suffix(image), "bench-")
        errors = store.save_labels([(i, masks[i], result_info(0.5)) for i in ids], "original")
        assert not errors, errors
        print(f"studies folder of {len(ids)} frames with a result each built in {time.perf_counter() - t:.0f} s")

        chunks = [ids[k:k + args.chunk] for k in range(0, args.rounds * 2 * args.chunk, args.chunk)]
        per_label: dict = {"one by one": [], "chunk": []}
        for r in range(args.rounds):
            for name, chunk in (("one by one", chunks[2 * r]), ("chunk", chunks[2 * r + 1])):
                labels = [(i, masks[i], result_info(float(rng.random()))) for i in chunk]
                start = time.perf_counter()
                if name == "chunk":
                    assert not store.save_labels(labels, "original")
                else:
                    for image_id, path, info in labels:
                        store.save_label(image_id, path, "original", info)
                per_label[name].append((time.perf_counter() - start) * 1e3 / len(chunk))
        saved = {n: statistics.median(v) for n, v in per_label.items()}

        model = store._datastore
        json_ms = median_ms(lambda: json.dumps(model.model_dump(exclude={"base_path"}), indent=2, default=str), repeat=5, warmup=1)
        pydantic_ms = median_ms(lambda: _datastore_json(model), repeat=5, warmup=1)
        size_kb = len(_datastore_json(model)) / 1024
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for path in locals().get("masks", {}).values():
            Path(path).unlink(missing_ok=True)
    rows = [{"save": name, "ms per label": ms, "vs one by one": ms / saved["one by one"]} for name, ms in saved.items()]
    print(f"\n{len(ids)} frames, chunks of {args.chunk}, {args.rounds} rounds in alternation (medians)")
    print_table(rows, ["save", "ms per label", "vs one by one"])
    print(f"\ndatastore file {size_kb:.0f} KiB: json.dumps(indent=2) {json_ms:.1f} ms, pydantic {pydantic_ms:.1f} ms "
          f"({json_ms / pydantic_ms:.1f}x)")
    write_json("datastore", {"images": len(ids), "chunk": args.chunk, "rounds": args.rounds, "ms_per_label": saved,
                             "chunk_vs_one_by_one": saved["chunk"] / saved["one by one"],
                             "datastore_file_kib": size_kb, "serialise_ms": {"json_dumps_indent": json_ms, "pydantic": pydantic_ms}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
