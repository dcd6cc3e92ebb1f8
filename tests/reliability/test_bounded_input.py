"""Hostile and faulty input, second round (issue 17), without a server: header fields that drive
work are bounded by the file, compressed streams stop at the size their header promises, a
large allowed frame costs bounded memory, geometry must be finite and non-singular, stored
infos and labels are validated before anything is written, messages carry no server paths, the
datastore notices every change of another process, and nothing changes the process umask."""

from __future__ import annotations

import io
import json
import os
import subprocess
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyroid_plugin.errors import ImageTooLargeError, InvalidImageError, client_text
from thyroid_plugin.io import load_image
from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore
from thyroid_plugin.studies import InvalidRequestError
from tests.support.nasty import GENERATED_EXPECTED, generated_payloads
from tests.support.paths import PYTHON, REPO

from .helpers import app_lib

PAYLOADS = generated_payloads(include_large_frame=False)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ decoding stays bounded
@pytest.mark.parametrize("name", sorted(n for n in PAYLOADS if n != "nrrd_line_skip_1e12.nrrd"))
def test_generated_payloads_are_refused_quickly_with_little_memory(tmp_path, name):
    """Each refused before its data is expanded: in seconds, under 32 MB of Python memory
    (pynrrd unpacked the whole bzip2/gzip stream and pydicom the whole deflated dataset). The
    ``line skip`` payload has its own test, in a subprocess with a deadline."""
    path = _write(tmp_path, name, PAYLOADS[name])
    expected = ImageTooLargeError if GENERATED_EXPECTED[name] == 413 else InvalidImageError
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(expected) as err:
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 5
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MB"
    if expected is InvalidImageError:
        assert not isinstance(err.value, ImageTooLargeError), err.value


def test_nrrd_line_skip_cannot_keep_a_core_busy(tmp_path):
    """``line skip: 10^12`` was honoured one readline at a time: a core at 100 % for good."""
    path = _write(tmp_path, "ls.nrrd", PAYLOADS["nrrd_line_skip_1e12.nrrd"])
    code = textwrap.dedent(f"""
        from thyroid_plugin.errors import InvalidImageError
        from thyroid_plugin.io import load_image
        try:
            load_image({str(path)!r})
        except InvalidImageError as e:
            print("refused:", e)
    """)
    t = time.time()
    out = subprocess.run([str(PYTHON), "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "refused" in out.stdout and "line skip" in out.stdout, out.stdout + out.stderr
    assert time.time() - t < 30


def test_nrrd_skips_within_the_file_still_read_the_right_pixels(tmp_path):
    pixels = (np.arange(16 * 16) % 251).astype(np.uint8).reshape(16, 16)  # [row, column]
    data = pixels.tobytes()  # NRRD raw: the first axis (columns) fastest
    head = "NRRD0004\ntype: uint8\ndimension: 2\nsizes: 16 16\n"
    for name, header, body in [("line.nrrd", head + "encoding: raw\nline skip: 2\n\n", b"junk line\nsecond\n" + data),
                               ("byte.nrrd", head + "encoding: raw\nbyte skip: 5\n\n", b"12345" + data),
                               ("tail.nrrd", head + "encoding: raw\nbyte skip: -1\n\n", b"anything before" + data)]:
        path = _write(tmp_path, name, header.encode() + body)
        np.testing.assert_array_equal(load_image(path).array, pixels)
    import bz2
    import gzip

    for name, encoding, packed in [("gz.nrrd", "gzip", gzip.compress(data)), ("bz.nrrd", "bzip2", bz2.compress(data))]:
        path = _write(tmp_path, name, (head + f"encoding: {encoding}\n\n").encode() + packed)
        np.testing.assert_array_equal(load_image(path).array, pixels)
    path = _write(tmp_path, "text.nrrd", (head + "encoding: ascii\n\n").encode() + " ".join(map(str, data)).encode())
    np.testing.assert_array_equal(load_image(path).array, pixels)


def test_a_small_deflated_dicom_still_reads(tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.support.nasty import _dicom

    pixels = (np.arange(32 * 32) % 200).astype(np.uint8).reshape(32, 32)
    ds = pydicom.dcmread(io.BytesIO(_dicom(32, 32, pixels.tobytes())))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(str(tmp_path / "deflated.dcm"), write_like_original=False)
    np.testing.assert_array_equal(load_image(tmp_path / "deflated.dcm").array, pixels)


def test_a_large_allowed_frame_costs_bounded_memory_and_time(tmp_path):
    """A 35 kB PNG of 6000 x 6000 (36 Mpx, under the limit) took 23 s and 6 GB: frames larger
    than 2048 px a side are shrunk by block averaging before the anti-aliased resize."""
    from thyroid_plugin.transforms import preprocess_transforms

    frame = np.zeros((6000, 6000), np.uint8)
    frame[::7] = 200
    path = _write(tmp_path, "big.png", _png(frame))
    del frame
    image = load_image(path)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        out = None
        for transform in preprocess_transforms(224):
            out = transform(out if out is not None else {"image": image, "roi": None})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tuple(out["image"].shape) == (3, 224, 224)
    assert time.perf_counter() - t < 8
    # (3, H, W) float32 is 432 MB; the anti-aliased resize of it took several times that
    assert peak < 600 << 20, f"{peak / 2**20:.0f} MB"


def test_shrinking_large_crops_keeps_the_result(tmp_path):
    """The block-averaged path gives (nearly) what the full anti-aliased resize gave."""
    from monai.transforms import Resized

    from thyroid_plugin.transforms import CropROId, LoadUltrasoundd

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (300, 300), dtype=np.uint8)
    frame = np.kron(base, np.ones((10, 10), np.uint8))  # 3000 x 3000, smooth at the 10 px scale
    d = LoadUltrasoundd()({"image": load_image(_write(tmp_path, "f.png", _png(frame)))})
    resize = Resized("image", spatial_size=(224, 224), mode="bilinear", anti_aliasing=True)
    direct = resize(CropROId()(dict(d)))["image"]
    shrunk = resize(CropROId(max_side=2048)(dict(d)))["image"]
    assert float(np.abs(np.asarray(direct) - np.asarray(shrunk)).mean()) < 0.02


# ------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("name", [n for n in PAYLOADS if "sform" in n or "directions" in n or "origin" in n
                                  or "spacing" in n])
def test_non_finite_or_singular_geometry_is_refused(tmp_path, name):
    with pytest.raises(InvalidImageError, match="geometry"):
        load_image(_write(tmp_path, name, PAYLOADS[name]))


# ------------------------------------------------------------------------------ messages
def test_decoder_messages_name_no_server_file_or_object():
    text = ("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9d00> in /tmp/tmpq1w2e3r4.png "
            "(see /work/wt/apps/thyroid_nodule/lib/routes.py, http://host/a/b)")
    safe = client_text(text)
    assert "0x7f" not in safe and "/tmp/" not in safe and "/work/" not in safe, safe
    assert "BytesIO" in safe and "routes.py" in safe and "http://host/a/b" in safe


def test_a_decoder_failure_does_not_show_the_temporary_file_name(tmp_path):
    path = _write(tmp_path, "tmpk8j2h1x0.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(InvalidImageError) as err:
        load_image(path)
    assert "tmpk8j2h1x0" not in str(err.value) and str(tmp_path) not in str(err.value), err.value


# ---------------------------------------------------------------------- datastore checks
@pytest.fixture
def store(tmp_path):
    s = ConfirmedCasesDatastore(str(tmp_path / "studies"))
    image = _write(tmp_path, "frame.png", _png(np.full((300, 300), 90, np.uint8)))
    s.add_image("frame", str(image), {})
    return s


def _snapshot(store) -> tuple:
    root = Path(store.path)
    return (Path(store.config_path).read_bytes(),
            sorted(str(p.relative_to(root)) for p in root.rglob("*")))


@pytest.mark.parametrize("case", ["small label", "dicom label", "tag newline", "bad roi", "huge roi"])
def test_labels_that_do_not_fit_their_image_are_refused_and_change_nothing(store, tmp_path, case):
    from tests.support.nasty import _dicom

    label = _write(tmp_path, "m.png", _png(np.zeros((300, 300), np.uint8)))
    tag, info = "final", {"diagnosis": "malignant"}
    if case == "small label":
        label = _write(tmp_path, "s.png", _png(np.zeros((50, 50), np.uint8)))
    elif case == "dicom label":
        label = _write(tmp_path, "m.dcm", _dicom(300, 300, bytes(300 * 300)))
    elif case == "tag newline":
        tag = "final\n"
    elif case == "bad roi":
        info["roi"] = [300, 300, -5, 1e300]
    else:
        info["roi"] = [10 ** 400, 0, 20, 20]
    before = _snapshot(store)
    with pytest.raises(InvalidRequestError):
        store.save_label("frame", str(label), tag, info)
    assert _snapshot(store) == before
    assert store.get_image_info("frame").get("diagnosis") is None


@pytest.mark.parametrize("info", [{"roi": [300, 300, -5, 1e300]}, {"roi": [0, 0, 10 ** 400, 5]}, {"ts": 0},
                                  {"name": "../other.png"}, {"diagnosis": "maybe"}])
def test_image_and_label_infos_are_validated_before_they_are_written(store, tmp_path, info):
    label = _write(tmp_path, "m.png", _png(np.zeros((300, 300), np.uint8)))
    store.save_label("frame", str(label), "final", {})
    before = _snapshot(store)
    with pytest.raises(InvalidRequestError):
        store.update_image_info("frame", info)
    with pytest.raises(InvalidRequestError):
        store.update_label_info("frame", "final", info)
    assert _snapshot(store) == before


def test_a_good_label_and_roi_are_still_stored(store, tmp_path):
    label = _write(tmp_path, "m.png", _png(np.zeros((300, 300), np.uint8)))
    store.save_label("frame", str(label), "final", {"diagnosis": "benign", "roi": [10, 10, 200, 250]})
    info = store.get_image_info("frame")
    assert info["diagnosis"] == "benign" and info["roi"] == [10.0, 10.0, 200.0, 250.0]
    store.update_image_info("frame", {"roi": [250, 250, 20, 20]})  # corners in either order


def test_a_change_by_another_process_is_seen_even_with_the_same_mtime(store, tmp_path):
    """Two writes within the file system's timestamp granularity looked unchanged (float
    ``st_mtime`` was compared); the inode, nanoseconds and size are compared now."""
    config = Path(store.config_path)
    store.list_images()
    before = os.stat(config)
    other = ConfirmedCasesDatastore(store.path)
    other.update_image_info("frame", {"case": "changed elsewhere"})
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))  # same timestamp as before
    assert store.get_image_info("frame").get("case") == "changed elsewhere"


# ------------------------------------------------------------------------------- umask
def test_importing_the_library_leaves_the_umask_alone_and_files_get_the_usual_mode(tmp_path):
    """``io`` set the process umask to 0 at import (process-wide, racy with other threads)."""
    code = textwrap.dedent(f"""
        import os
        calls = []
        real = os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        real(0o027)
        from thyroid_plugin.io import atomic_write_bytes
        atomic_write_bytes({str(tmp_path / 'f.bin')!r}, b"x")
        print(calls, oct(os.stat({str(tmp_path / 'f.bin')!r}).st_mode & 0o777))
    """)
    out = subprocess.run([str(PYTHON), "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["[]", "0o640"], out.stdout + out.stderr


# ------------------------------------------------------------------------- train options
@pytest.mark.parametrize("options", [{"max_epochs": -1}, {"max_epochs": 0}, {"max_epochs": 1.5}, {"val_split": 2},
                                     {"val_split": 0}, {"learning_rate": "abc"}, {"learning_rate": -1},
                                     {"train_batch_size": 0}, {"pretrained": "yes"}, {"publish": "never"},
                                     {"early_stop_patience": -2}, {"max_epochs": 10 ** 400}, {"calibration": "isotonic"},
                                     {"calibration": None}, [1, 2]])
def test_bad_train_options_are_refused(options):
    app_lib()
    from lib.trainers.classify_nodule import check_train_options

    with pytest.raises(InvalidRequestError):
        check_train_options(options)


def test_good_train_options_pass():
    app_lib()
    from lib.trainers.classify_nodule import check_train_options

    check_train_options({"max_epochs": 2, "val_split": 0.25, "learning_rate": 1e-4, "train_batch_size": 4,
                         "pretrained": False, "publish": "always", "early_stop_patience": 0, "device": "cpu",
                         "calibration": "none"})
    check_train_options({"calibration": "temperature"})


def test_answers_name_no_server_paths_and_no_tracebacks(tmp_path):
    app_lib()
    from lib.routes import client_safe

    details = ["[train] epoch 1\n", "Traceback (most recent call last):\n",
               '  File "/work/x/engine.py", line 10, in fit\n', "    raise DatalistError(msg)\n", "    ^^^^^^^^^\n",
               "thyroid_plugin.errors.DatalistError: needs 4 cases in /work/x/studies\n"]
    answer = client_safe({"details": details, "path": str(tmp_path / "studies" / "a.png"),
                          "source": "/data/ddti/1_1.png", "n": 3}, str(tmp_path / "studies"))
    text = json.dumps(answer)
    assert "Traceback" not in text and "/work/" not in text and "/data/" not in text and str(tmp_path) not in text
    assert answer["path"] == "a.png" and answer["source"] == "1_1.png" and answer["n"] == 3
    assert answer["details"][0] == "[train] epoch 1\n" and "needs 4 cases" in answer["details"][-1]
