"""Fuzzing the upload and ``params`` parsing of a real server with hypothesis: mutated real files
(DDTI PNG frames, a 3D Slicer-style NRRD, DICOM, NIfTI, JPEG, and the generated payloads of
``tests.support.nasty.generated_payloads``: bit flips, truncation, inserted bytes, forged header
fields), random bytes, random file names, and random ``params`` / ``info``
text and JSON. Every answer must be below 500, and the server must keep answering.

The examples are derandomised (the same ones on every CI run) and bounded; set
``FUZZ_EXAMPLES=2000 FUZZ_RANDOM=1`` for a longer, random local run.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.paths import DDTI

from .helpers import TIMEOUT, datastore_objects, files_under

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------- seed files
def _seeds() -> dict:
    import nibabel as nib
    import nrrd
    from PIL import Image

    from tests.support.nasty import _dicom

    png = (DDTI / "images" / "10_1.png").read_bytes()
    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[::4, ::4]
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz-seed-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(tmp / "f.nrrd"), np.ascontiguousarray(gray.T[:, :, None]),
               {"space": "left-posterior-superior", "space directions": np.diag([0.1, 0.1, 1.0]),
                "space origin": [1.0, 2.0, 3.0], "kinds": ["domain"] * 3, "encoding": "gzip"})
    nib.save(nib.Nifti1Image(gray.T[:, :, None].astype(np.uint8), np.diag([0.1, 0.1, 1.0, 1.0])), str(tmp / "f.nii"))
    seeds = {"png": png, "jpeg": jpeg, "nrrd": (tmp / "f.nrrd").read_bytes(), "nifti": (tmp / "f.nii").read_bytes(),
             "dicom": _dicom(gray.shape[0], gray.shape[1], gray.tobytes())}
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    # the payloads of issue 17 (work-driving NRRD fields, compressed bombs, NaN or singular
    # geometry), keyed "<format>:<payload>" so that header forging treats them as their format
    from tests.support.nasty import generated_payloads

    for name, data in generated_payloads(include_large_frame=False).items():
        seeds[f"{_format_of(name)}:{name}"] = data
    return seeds


def _format_of(name: str) -> str:
    return {"nrrd": "nrrd", "dicom": "dicom", "nifti": "nifti", "png": "png"}[name.split("_", 1)[0]]


SEEDS = _seeds()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@st.composite
def mutated_file(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    ops = draw(st.lists(st.sampled_from(["flip", "truncate", "insert", "header", "repeat"]), min_size=1, max_size=3))
    for op in ops:
        if not data:
            break
        if op == "flip":
            for pos in draw(st.lists(st.integers(0, min(len(data), 2048) - 1), min_size=1, max_size=8)):
                data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = bytes(data[:draw(st.integers(1, 512))]) * draw(st.integers(1, 4))
        elif op == "header":
            data = bytearray(_forge_header(kind, bytes(data), draw))
    return kind, bytes(data)


def _forge_header(kind: str, data: bytes, draw) -> bytes:
    kind = kind.split(":", 1)[0]
    big = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 7, 8, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]))
    if kind == "png" and data[12:16] == b"IHDR":
        w, h = draw(big), draw(big)
        ihdr = struct.pack(">II", w, h) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]
    if kind == "nrrd":
        head, _, body = data.partition(b"\n\n")
        lines = head.split(b"\n")
        field = draw(st.sampled_from([b"sizes", b"type", b"dimension", b"encoding", b"kinds", b"space directions",
                                      b"byte skip", b"line skip", b"data file", b"endian"]))
        value = draw(st.one_of(st.sampled_from([b"-1", b"0", b"99999999999999999999", b"double", b"block", b"raw",
                                                b"bzip2", b"(nan,nan,nan) (1,0,0) (0,1,0)", b"../../../etc/hostname",
                                                b"LIST", b"1 2 3 4 5 6 7 8", b"big"]),
                               st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))))
        lines = [ln for ln in lines if not ln.startswith(field + b":")] + [field + b": " + value]
        return b"\n".join(lines) + b"\n\n" + body
    if kind == "nifti" and len(data) >= 348:
        b = bytearray(data)
        dims = [draw(st.integers(-5, 8))] + [draw(st.integers(-2, 32767)) for _ in range(7)]
        struct.pack_into("<8h", b, 40, *dims)
        struct.pack_into("<h", b, 70, draw(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1536, 2304, 9999])))
        struct.pack_into("<f", b, 108, draw(st.floats(allow_nan=True, allow_infinity=True, width=32)))
        return bytes(b)
    if kind == "dicom":
        at = data.find(b"\x28\x00\x10\x00")  # (0028,0010) Rows
        if at > 0:
            b = bytearray(data)
            struct.pack_into("<H", b, at + 8, draw(st.integers(0, 65535)))
            struct.pack_into("<H", b, at + 18, draw(st.integers(0, 65535)))  # Columns follows
            return bytes(b)
    return data


any_upload = st.one_of(mutated_file(), st.binary(max_size=4096).map(lambda b: ("random", b)))

file_names = st.one_of(st.sampled_from(["frame.png", "frame.nrrd", "f.nii.gz", "f.dcm", "x", "", "../../../etc/passwd",
                                        "a\x00b.png", "x" * 400]),
                       st.text(max_size=300))

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=6), st.dictionaries(st.text(max_size=10), children, max_size=6)),
    max_leaves=30)

roi_like = st.one_of(st.lists(st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False)),
                              min_size=0, max_size=6), json_values)

params_objects = st.fixed_dictionaries({}, optional={
    "roi": roi_like, "frame": st.one_of(st.integers(-5, 10**9), json_values), "diagnosis": st.one_of(
        st.sampled_from(["benign", "malignant", "BENIGN", 0, 1, 2, None, ""]), json_values),
    "case": json_values, "threshold": json_values, "device": json_values, "result_extension": json_values,
    "cache_transforms": json_values, "logging": json_values,
})

params_texts = st.one_of(
    params_objects.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=300),
    st.sampled_from(['{"roi": [NaN, 1, 2, 3]}', '{"frame": Infinity}', "[" * 3000 + "]" * 3000, '{"roi": {"a": 1}}',
                     '{"roi": [0, 0, 1e308, 1e308]}', '{"roi": [-1e308, -1e308, 1e308, 1e308]}', "\x00", "{}" * 1000]),
)


def _alive(url: str) -> None:
    assert requests.get(f"{url}/info/", timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------------------------- tests
def test_fuzz_infer_uploads_and_params(shared_server):
    url = shared_server.url
    count = {"n": 0}

    @FUZZ
    @given(upload=any_upload, name=file_names, params=params_texts,
           output=st.sampled_from(["json", "image", "all", "", "dicom_seg", "bogus"]))
    def run(upload, name, params, output):
        kind, data = upload
        r = requests.post(f"{url}/infer/classify_nodule", params={"output": output} if output else None,
                          files={"file": (name, data, "application/octet-stream")}, data={"params": params},
                          timeout=TIMEOUT)
        assert r.status_code < 500, (kind, name[:40], params[:80], r.status_code, r.text[:300])
        count["n"] += 1
        if count["n"] % 20 == 0:
            _alive(url)

    run()
    _alive(url)
    assert count["n"] >= min(EXAMPLES, 100), count  # the examples really ran


def test_fuzz_datastore_uploads_and_infos(shared_server):
    url = shared_server.url
    studies = shared_server.studies
    outside_before = sorted(p.name for p in shared_server.root.iterdir())
    target = sorted(datastore_objects(url))[0]
    count = {"n": 0}

    @FUZZ
    @given(upload=any_upload, name=file_names, params=params_texts, info=params_texts,
           image_id=st.one_of(st.sampled_from(["fuzz_img", "fuzz img (2)", "", "../x", "a/b"]), st.text(max_size=140)),
           tag=st.one_of(st.sampled_from(["final", "original", "fuzz", "../x", ""]), st.text(max_size=70)))
    def run(upload, name, params, info, image_id, tag):
        kind, data = upload
        calls = [
            requests.put(f"{url}/datastore/image", params={"image": image_id} if image_id else None,
                         files={"file": (name, data)}, data={"params": params}, timeout=TIMEOUT),
            requests.put(f"{url}/datastore/label", params={"image": target, "tag": tag},
                         files={"label": (name, data)}, data={"params": params}, timeout=TIMEOUT),
            requests.put(f"{url}/datastore/image/info", params={"image": target}, data={"info": info}, timeout=TIMEOUT),
            requests.get(f"{url}/datastore/image/info", params={"image": image_id}, timeout=TIMEOUT),
        ]
        for r in calls:
            assert r.status_code < 500, (kind, name[:40], image_id[:40], tag[:20], r.request.method, r.url[:120],
                                         r.status_code, r.text[:300])
        count["n"] += 1

    run()
    _alive(url)
    assert count["n"] >= min(EXAMPLES, 100), count
    assert sorted(p.name for p in shared_server.root.iterdir()) == outside_before
    # the datastore is still whole: MONAI Label can read it, and every record has its file
    from .helpers import check_studies_consistent

    check_studies_consistent(studies)
    assert files_under(studies)


def test_fuzz_batch_and_active_learning_options(shared_server):
    url = shared_server.url

    @settings(FUZZ, max_examples=max(10, EXAMPLES // 6))
    @given(body=st.one_of(params_objects, st.dictionaries(st.sampled_from(
        ["images", "batch_size", "max_batch_size", "label_tag", "model", "device", "max_compute"]), json_values,
        max_size=4)), images=st.sampled_from(["all", "labeled", "unlabeled", "bogus", ""]))
    def run(body, images):
        body = {**body, "max_batch_size": 2} if not isinstance(body.get("max_batch_size"), int) else body
        r = requests.post(f"{url}/batch/infer/classify_nodule", params={"images": images, "run_sync": "true"}, json=body,
                          timeout=TIMEOUT)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        r = requests.post(f"{url}/activelearning/uncertain", json=body, timeout=TIMEOUT)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])

    run()
    _alive(url)
