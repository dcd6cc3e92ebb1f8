"""Pack ``../shared/data`` into parts small enough for a GPU machine that takes at most 64 MiB a
call with the repository (docs/evaluation.md, "The gpu protocol"): gray frames as JPEG (quality
95 by default: PSNR ~45-48 dB, max error ~10 grey levels; measured and written to
``pack_stats.json``), lesion masks as 1-bit PNG (lossless), the CSVs with the new file names.

    python scripts/device/pack_data.py --out .dev          # .dev1/data, .dev2/data, ...

Part 1 holds DDTI whole; every part stays under ``--cap-mib``. On the machine, copying every
part's ``data/`` into one folder gives ``ddti/`` and ``busbra/`` for ``--data-root``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(src: Path, quality: int) -> tuple[bytes, float, int, int]:
    """JPEG bytes of a gray 8-bit frame, its squared error sum, max error and pixel count."""
    a = np.array(Image.open(src))
    if a.ndim != 2 or a.dtype != np.uint8:
        raise SystemExit(f"{src}: expected an 8-bit gray frame, got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality, subsampling=0)
    d = np.array(Image.open(io.BytesIO(buf.getvalue()))).astype(np.int16) - a
    return buf.getvalue(), float((d.astype(np.int64) ** 2).sum()), int(np.abs(d).max()), a.size


def _mask_png(src: Path) -> bytes:
    m = np.array(Image.open(src))
    buf = io.BytesIO()
    Image.fromarray(m > 0).save(buf, format="PNG", optimize=True)  # the masks' nonzero pixels, as read everywhere
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--out", required=True, help="prefix of the part folders (e.g. .dev -> .dev1, .dev2)")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--cap-mib", type=float, default=52.0, help="largest part (the repository travels beside it)")
    args = p.parse_args(argv)
    data, cap = Path(args.data), int(args.cap_mib * 2**20)
    files: list[tuple[str, bytes]] = []  # (relative path, content), in packing order
    stats = {}
    for ds in ("ddti", "busbra"):
        with open(data / ds / "labels.csv", newline="", encoding="utf-8-sig") as fp:
            rows = list(csv.DictReader(fp))
        se = n = worst = 0
        masks = []
        for r in rows:
            blob, err, mx, size = _encode(data / ds / r["file"], args.quality)
            se, n, worst = se + err, n + size, max(worst, mx)
            r["file"] = str(Path(r["file"]).with_suffix(".jpg"))
            files.append((f"{ds}/{r['file']}", blob))
            if r.get("mask"):
                masks.append((f"{ds}/{r['mask']}", _mask_png(data / ds / r["mask"])))
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        extras = [(f"{ds}/labels.csv", out.getvalue().encode())]
        extras += [(f"{ds}/{f.name}", f.read_bytes()) for f in sorted((data / ds).iterdir())
                   if f.suffix in (".csv", ".txt") and f.name != "labels.csv"]
        files += masks + extras
        stats[ds] = {"frames": len(rows), "jpeg_quality": args.quality, "max_abs_error": worst,
                     "rmse": round(math.sqrt(se / n), 3), "psnr_db": round(10 * math.log10(255**2 * n / se), 2)}
    parts: list[list[tuple[str, bytes]]] = [[]]
    used = 0
    for rel, blob in files:
        if used + len(blob) > cap and parts[-1]:
            parts.append([])
            used = 0
        parts[-1].append((rel, blob))
        used += len(blob)
    for k, part in enumerate(parts, start=1):
        root = Path(f"{args.out}{k}")
        shutil.rmtree(root, ignore_errors=True)
        for rel, blob in part:
            (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "data" / rel).write_bytes(blob)
        print(f"{root}: {len(part)} files, {sum(len(b) for _, b in part) / 2**20:.1f} MiB", file=sys.stderr)
    (Path(f"{args.out}1") / "pack_stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
