"""NodulePredictor on real DDTI frames with the small real models of tests/conftest.py."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from thyroid_plugin.checkpoint import load_checkpoint, model_identity
from thyroid_plugin.errors import InvalidModelError, InvalidROIError, ModelNotFoundError
from thyroid_plugin.inference import NodulePredictor, batch_plan, label_of, postprocess, preprocess
from thyroid_plugin.io import UltrasoundImage, load_image
from thyroid_plugin.transforms import preprocess_transforms
from tests.support.paths import ddti_subset


@pytest.fixture(scope="module")
def frames() -> list[str]:
    return [r["file"] for r in ddti_subset(2, 2, offset=10)]


@pytest.fixture(scope="module")
def predictor(small_model) -> NodulePredictor:
    return NodulePredictor(small_model, device="cpu")


def test_prediction_on_real_frames(predictor, frames, small_model):
    for path in frames:
        image = load_image(path)
        pred = predictor.predict(path)
        assert set(pred.probabilities) == {"benign", "malignant"}
        assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= p <= 1.0 for p in pred.probabilities.values())
        assert pred.label == ("malignant" if pred.probabilities["malignant"] >= predictor.threshold else "benign")
        assert pred.threshold == predictor.threshold == load_checkpoint(small_model)["threshold"]
        assert pred.saliency.shape == image.shape  # the frame's own grid, not the network's 64x64
        assert pred.saliency.dtype == np.float32
        assert 0.0 <= pred.saliency.min() and pred.saliency.max() <= 1.0
        assert pred.roi is None
        assert pred.model == model_identity(small_model)
        u8 = pred.saliency_uint8()
        assert u8.dtype == np.uint8 and np.array_equal(u8, np.rint(pred.saliency * 255).astype(np.uint8))
        j = pred.to_json()
        assert j["label"] == pred.label and j["roi"] is None and json.dumps(j)


def test_a_non_square_frame_keeps_its_shape(predictor, frames, tmp_path):
    gray = np.array(Image.open(frames[0]).convert("L"))[:, :217]  # 300 x 217
    Image.fromarray(gray).save(tmp_path / "narrow.png")
    pred = predictor.predict(str(tmp_path / "narrow.png"))
    assert pred.saliency.shape == (300, 217)


def test_roi_pastes_the_crop_prediction_inside_the_box(predictor, frames, tmp_path):
    path = frames[1]
    box = [40, 70, 230, 250]  # x0, y0, x1, y1
    with_roi = predictor.predict(path, box)
    # the same frame cropped by hand and classified whole
    gray = np.array(Image.open(path))
    Image.fromarray(gray[70:250, 40:230]).save(tmp_path / "crop.png")
    crop = predictor.predict(str(tmp_path / "crop.png"))
    assert with_roi.roi == box
    assert with_roi.saliency.shape == gray.shape[:2]
    outside = np.ones(gray.shape[:2], bool)
    outside[70:250, 40:230] = False
    assert np.all(with_roi.saliency[outside] == 0.0)
    np.testing.assert_allclose(with_roi.saliency[70:250, 40:230], crop.saliency, atol=1e-5)
    assert with_roi.saliency[70:250, 40:230].max() > 0
    assert with_roi.probabilities["malignant"] == pytest.approx(crop.probabilities["malignant"], abs=1e-5)


def test_roi_is_clipped_and_checked(predictor, frames):
    pred = predictor.predict(frames[0], [250.5, 260, 400, 420])
    assert pred.roi == [250, 260, 300, 300]
    assert np.all(pred.saliency[:260, :] == 0) and np.all(pred.saliency[:, :250] == 0)
    with pytest.raises(InvalidROIError):
        predictor.predict(frames[0], [320, 0, 400, 50])


def test_predict_batch_equals_predict(predictor, frames):
    rois = [None, [30, 30, 200, 220], None, [0, 0, 150, 300]]
    batch = predictor.predict_batch(frames, rois)
    assert len(batch) == len(frames)
    for path, roi, b in zip(frames, rois, batch):
        single = predictor.predict(path, roi)
        assert b.label == single.label and b.roi == single.roi
        for k in b.probabilities:
            assert b.probabilities[k] == pytest.approx(single.probabilities[k], abs=1e-5)
        np.testing.assert_allclose(b.saliency, single.saliency, atol=1e-5)
    with pytest.raises(ValueError, match="rois"):
        predictor.predict_batch(frames, [None])


def test_reload_if_changed_picks_up_a_replaced_model(small_model, other_small_model, frames, tmp_path):
    served = tmp_path / "model.pt"
    shutil.copyfile(small_model, served)
    p = NodulePredictor(served, device="cpu")
    first = p.predict(frames[0])
    assert p.model_id == model_identity(small_model)
    assert p.reload_if_changed() is False

    tmp = tmp_path / ".incoming.pt"
    shutil.copyfile(other_small_model, tmp)
    os.replace(tmp, served)  # how training publishes a model: an atomic replace
    assert p.reload_if_changed() is True
    assert p.model_id == model_identity(other_small_model) != model_identity(small_model)
    second = p.predict(frames[0])
    assert second.model == p.model_id
    assert second.probabilities["malignant"] != pytest.approx(first.probabilities["malignant"], abs=1e-7) or not np.allclose(
        second.saliency, first.saliency)
    assert p.reload_if_changed() is False

    # a damaged replacement is reported and the current model keeps serving
    served.write_bytes(b"garbage")
    with pytest.raises(InvalidModelError):
        p.reload_if_changed()
    assert p.model_id == model_identity(other_small_model)
    assert p.predict(frames[0]).probabilities == pytest.approx(second.probabilities)


def test_compiled_network_of_a_replaced_model_serves_the_new_weights(small_model, other_small_model, frames, tmp_path):
    """The compiled network holds its weights as constants (freezing), so a published model must
    get a compilation of its own: after a reload, batch-1 answers are the new model's, never the
    frozen weights of the previous one."""
    served = tmp_path / "model.pt"
    shutil.copyfile(small_model, served)
    p = NodulePredictor(served, device="cpu", precision="fp32", compile="on")
    assert p.info()["compiled"] == "ready"
    tmp = tmp_path / ".incoming.pt"
    shutil.copyfile(other_small_model, tmp)
    os.replace(tmp, served)
    assert p.reload_if_changed() is True
    assert p.info()["compiled"] == "ready"
    expected = NodulePredictor(other_small_model, device="cpu", precision="fp32")
    previous = NodulePredictor(small_model, device="cpu", precision="fp32")
    for path in frames[:3]:
        got, want = p.predict(path), expected.predict(path)
        assert got.probabilities["malignant"] == pytest.approx(want.probabilities["malignant"], abs=1e-4)
        assert float(np.abs(got.saliency - want.saliency).mean()) < 1e-3
    assert float(np.abs(p.predict(frames[0]).saliency - previous.predict(frames[0]).saliency).mean()) > 1e-3


def test_model_errors(tmp_path, small_model):
    with pytest.raises(ModelNotFoundError):
        NodulePredictor(tmp_path / "absent.pt", device="cpu")
    (tmp_path / "bad.pt").write_text("not a model")
    with pytest.raises(InvalidModelError):
        NodulePredictor(tmp_path / "bad.pt", device="cpu")
    with pytest.raises(InvalidModelError, match="trained with network"):
        NodulePredictor(small_model, device="cpu", network_def={"_target_": "thyroid_plugin.networks.SaliencyGuidedClassifier",
                                                                "base_channels": 16})


def test_info_describes_the_model(predictor, small_model):
    info = predictor.info()
    assert info["model"] == model_identity(small_model)
    assert info["image_size"] == 64 == predictor.image_size
    assert info["network"]["_target_"].endswith("SaliencyGuidedClassifier")
    assert info["precision"] == "fp32" and info["device"] == "cpu"


# ------------------------------------------------------------------ pre- and post-processing
def _frame(h: int = 40, w: int = 60) -> UltrasoundImage:
    return UltrasoundImage(array=(np.arange(h * w).reshape(h, w) % 256).astype(np.uint8))


def test_preprocess_makes_the_network_input_of_the_box():
    transforms = Compose(preprocess_transforms(16))
    whole = preprocess(_frame(), None, transforms)
    assert whole.input.shape == (3, 16, 16) and whole.input.dtype == torch.float32
    assert 0.0 <= float(whole.input.min()) and float(whole.input.max()) <= 1.0
    assert whole.box == [0, 0, 60, 40] and whole.roi is None  # no roi asked: none reported
    asked_whole = preprocess(_frame(), [0, 0, 60, 40], transforms)
    assert asked_whole.roi == [0, 0, 60, 40]  # a roi asked is reported, even the whole frame
    torch.testing.assert_close(asked_whole.input, whole.input)
    boxed = preprocess(_frame(), [50.5, 10, 90, 30], transforms)
    assert boxed.box == boxed.roi == [50, 10, 60, 30]  # rounded outward, clipped to the frame
    white = UltrasoundImage(array=np.full((16, 16), 255, np.uint8))  # the network's size: no resampling
    assert torch.all(preprocess(white, None, transforms).input == 1.0)  # 8-bit: divided by 255
    with pytest.raises(InvalidROIError):
        preprocess(_frame(), [70, 0, 90, 10], transforms)


def test_label_of_uses_the_threshold_inclusively():
    assert label_of({"benign": 0.4, "malignant": 0.6}, 0.6) == "malignant"
    assert label_of({"benign": 0.41, "malignant": 0.59}, 0.6) == "benign"
    assert label_of({"benign": 0.9, "malignant": 0.1}, 0.05) == "malignant"


def test_postprocess_turns_network_outputs_into_predictions_on_each_frame():
    transforms = Compose(preprocess_transforms(8))
    frames = [preprocess(_frame(), None, transforms), preprocess(_frame(30, 20), [5, 10, 15, 25], transforms)]
    logits = torch.tensor([[0.0, float(np.log(3.0))], [float(np.log(4.0)), 0.0]])
    saliency_logits = torch.full((2, 1, 8, 8), 20.0)  # sigmoid ~ 1 everywhere the network sees
    got = postprocess(frames, logits, saliency_logits, model="sha256:x", threshold=0.5, mask_threshold=0.3)
    assert [p.label for p in got] == ["malignant", "benign"]
    assert got[0].probabilities == pytest.approx({"benign": 0.25, "malignant": 0.75})
    assert got[1].probabilities == pytest.approx({"benign": 0.8, "malignant": 0.2})
    assert got[0].saliency.shape == (40, 60) and np.allclose(got[0].saliency, 1.0)
    inside = np.zeros((30, 20), bool)
    inside[10:25, 5:15] = True
    assert got[1].saliency.shape == (30, 20)
    assert np.allclose(got[1].saliency[inside], 1.0) and np.all(got[1].saliency[~inside] == 0.0)
    assert [p.roi for p in got] == [None, [5, 10, 15, 25]]
    assert all(p.model == "sha256:x" and p.threshold == 0.5 and p.mask_threshold == 0.3 for p in got)
    without = postprocess(frames[:1], logits[:1], None, model="m", threshold=0.8, mask_threshold=0.5)[0]
    assert without.label == "benign" and not without.saliency.any()  # a network without saliency


# --------------------------------------------------------------------------- compiled serving
def test_compile_mode_words():
    from thyroid_plugin.inference import compile_mode

    assert [compile_mode(v) for v in (False, None, "off", "false", True, "on", "TRUE", "background")] == \
        ["off", "off", "off", "off", "on", "on", "on", "background"]
    with pytest.raises(ValueError, match="off, on or background"):
        compile_mode("sometimes")


def test_compiled_network_serves_its_batch_sizes_and_matches_eager(small_model, frames):
    """A real ``torch.compile`` (inductor, freezing) of the served network for batch sizes 1 and 2:
    once warmed, batches run through the compiled networks (a batch of 3 in chunks of the compiled
    sizes, the one measured cheaper per image first) and agree with the eager network, and no
    request ever recompiles."""
    eager = NodulePredictor(small_model, device="cpu", precision="fp32")
    compiled = NodulePredictor(small_model, device="cpu", precision="fp32", compile="on", compile_batch_sizes=(1, 2))
    info = compiled.info()
    assert info["compiled"] == "ready", info["compiled"]
    assert info["compiled_batch_sizes"] == [1, 2]
    costs = info["compiled_cost_vs_eager"]  # measured at warm-up; they choose the split
    assert set(costs) == set(info["compiled_ms_per_image"]) == {"1", "2"}
    assert all(c > 0 for c in costs.values()) and all(ms > 0 for ms in info["compiled_ms_per_image"].values())
    plan = batch_plan(3, compiled.loaded.compiled)
    cheaper = min((1, 2), key=lambda b: (costs[str(b)], -b))
    assert [stop - start for start, stop, _ in plan] == ([1, 1, 1] if cheaper == 1 else [2, 1])
    assert all(runner is not None for _, _, runner in plan)
    from torch._dynamo.utils import counters

    compiled_frames = sum(counters["frames"].values())
    for path in frames:
        a, b = compiled.predict(path), eager.predict(path)
        assert a.probabilities["malignant"] == pytest.approx(b.probabilities["malignant"], abs=1e-4)
        assert float(np.abs(a.saliency - b.saliency).mean()) < 1e-3
    for batch in (frames[:2], frames[:3], frames):
        for path, p in zip(batch, compiled.predict_batch(batch)):
            assert p.probabilities["malignant"] == pytest.approx(eager.predict(path).probabilities["malignant"], abs=1e-4)
    assert sum(counters["frames"].values()) == compiled_frames, "a request recompiled the network"


def test_compiled_network_has_frozen_weights_and_shares_no_tensor_with_the_served_one(small_model):
    """Inductor froze the weights into the compiled code (batch norms folded into the
    convolutions, convolution and linear weights prepacked for oneDNN: the fast path; counted by
    inductor's pattern counters, which stay at 0 when freezing is silently ignored); the
    compilation was built from a private copy, so the compiling thread never touched a tensor of
    the eager network that serves requests meanwhile; and no served parameter requires grad (with
    grad, autocast's process-wide weight-cast cache is used: the hang of issue 12)."""
    from torch._dynamo.utils import counters

    before = dict(counters["inductor"])
    p = NodulePredictor(small_model, device="cpu", precision="fp32", compile="on")
    grew = {k: counters["inductor"][k] - before.get(k, 0) for k in
            ("binary_folding_conv", "mkldnn_conv_weight_pack_matcher_count", "mkldnn_linear_weight_pack_matcher_count")}
    assert all(v > 0 for v in grew.values()), grew
    served = p.loaded.network
    assert not any(t.requires_grad for t in served.parameters())
    copy = p.loaded.compiled.runner(1)._orig_mod
    assert copy is not served
    served_storage = {t.untyped_storage().data_ptr() for t in list(served.parameters()) + list(served.buffers())}
    assert not served_storage & {t.untyped_storage().data_ptr() for t in list(copy.parameters()) + list(copy.buffers())}


def test_batch_plan_splits_batches_into_the_cheapest_compiled_size_per_image():

    class Ready:
        def __init__(self, sizes, costs=None):
            self.sizes, self._costs = sizes, costs or {}

        def ready_sizes(self):
            return sorted(self.sizes)

        def costs(self):
            return {b: c for b, c in self._costs.items() if b in self.sizes}

        def runner(self, n):
            return f"c{n}" if n in self.sizes else None

    # no cost measured: largest ready size first, whole when it fits
    assert batch_plan(5, Ready([])) == [(0, 5, None)]
    assert batch_plan(8, Ready([1, 8])) == [(0, 8, "c8")]
    assert batch_plan(11, Ready([1, 8])) == [(0, 8, "c8"), (8, 9, "c1"), (9, 10, "c1"), (10, 11, "c1")]
    assert batch_plan(40, Ready([1, 8, 32])) == [(0, 32, "c32"), (32, 40, "c8")]
    assert batch_plan(5, Ready([8])) == [(0, 5, None)]  # nothing ready fits: eager, whole
    assert batch_plan(13, Ready([8, 32])) == [(0, 8, "c8"), (8, 13, None)]
    # batching pays (bf16 on AMX): batches of 8, the rest one by one
    assert batch_plan(11, Ready([1, 8], {1: 0.40, 8: 0.30})) == [(0, 8, "c8"), (8, 9, "c1"), (9, 10, "c1"),
                                                                   (10, 11, "c1")]
    # batching does not pay on this CPU: a batch of 8 runs as eight compiled batch-1 calls
    assert batch_plan(8, Ready([1, 8], {1: 0.70, 8: 0.78})) == [(i, i + 1, "c1") for i in range(8)]
    # a size not measured yet counts as free only against sizes not measured either
    assert batch_plan(9, Ready([1, 8], {1: 0.70})) == [(0, 8, "c8"), (8, 9, "c1")]
    # a tie goes to the larger size
    assert batch_plan(8, Ready([1, 8], {1: 0.5, 8: 0.5})) == [(0, 8, "c8")]


def test_background_compilation_serves_eagerly_until_ready_and_survives_failure(small_model, frames, monkeypatch):
    """With ``compile="background"`` the constructor returns at once; a compilation that fails
    (here: the compiler raises, as it does on a machine without a C++ toolchain) leaves the eager
    network serving and says why in ``info()``."""
    import threading

    import torch

    release = threading.Event()

    def failing_compile(*args, **kwargs):
        release.wait(30)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", failing_compile)
    eager = NodulePredictor(small_model, device="cpu", precision="fp32")
    p = NodulePredictor(small_model, device="cpu", precision="fp32", compile="background")
    assert p.info()["compiled"] == "compiling"
    before = p.predict(frames[0])  # answered while the compilation is still running
    assert before.probabilities == pytest.approx(eager.predict(frames[0]).probabilities)
    release.set()
    status = p.wait_compiled(timeout=30)
    assert status.startswith("failed") and "no C++ compiler found" in status
    assert p.info()["compiled"] == status and p.info()["compiled_batch_sizes"] == []
    after = p.predict(frames[0])
    assert after.probabilities == pytest.approx(before.probabilities)


def test_eager_forwards_beside_a_background_compilation_never_meet_a_plain_fx_trace(small_model, frames):
    """While an FX tracer traces, ``torch.nn.Module.__call__`` is replaced process-wide; the plain
    ``torch.fx.Tracer`` then makes every other thread's forward fail (``NameError: module is not
    installed as a submodule``: an HTTP 500 in CI at a cold start, when inductor traced its
    once-per-process placeholder in the compiling thread). A real background compilation from a
    cold process state (that placeholder not built yet, inductor's caches off so code is
    generated) is watched: every FX trace in the compiling thread must be one that passes
    foreign module calls through (``make_fx``'s tracers), and eager classifications sent
    throughout must all answer as the eager network does."""
    import threading

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.loop_body import InterpreterShim
    from torch.fx._symbolic_trace import Tracer
    from torch.fx.experimental.proxy_tensor import PythonKeyTracer

    traces: list[tuple[str, type]] = []
    original_trace = Tracer.trace

    def watched_trace(self, *args, **kwargs):
        traces.append((threading.current_thread().name, type(self)))
        return original_trace(self, *args, **kwargs)

    InterpreterShim._dummy_gm.cache_clear()  # as in a new server process
    eager = NodulePredictor(small_model, device="cpu", precision="fp32")
    expected = {path: eager.predict(path).probabilities for path in frames}
    with pytest.MonkeyPatch.context() as mp, \
            inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        mp.setattr(Tracer, "trace", watched_trace)
        p = NodulePredictor(small_model, device="cpu", precision="fp32", compile="background")
        answered = 0
        while p.info()["compiled"] == "compiling":
            path = frames[answered % len(frames)]
            assert p.predict(path).probabilities == pytest.approx(expected[path], abs=1e-5)
            answered += 1
        assert p.wait_compiled(timeout=600) == "ready"
    compiling = [kind for thread, kind in traces if thread == "compile-model"]
    assert compiling, "the compilation ran no FX trace: the watch saw nothing"
    plain = [kind.__name__ for kind in compiling if not issubclass(kind, PythonKeyTracer)]
    assert not plain, f"plain FX traces in the compiling thread: {plain}"
    assert answered >= 3, answered  # the classifications did overlap the compilation
    assert p.predict(frames[0]).probabilities == pytest.approx(expected[frames[0]], abs=1e-4)


def test_served_frames_do_not_fault_in_fresh_memory(frames):
    """After warm-up a frame reuses the memory of the previous one: glibc's malloc is kept from
    returning freed activations to the OS (which cost ~10,000 page faults and ~25 ms per frame
    with the shipped 224x224 model on the benchmark machine). Counted, not timed."""
    import resource

    from thyroid_plugin.config import load_config
    from tests.support.paths import REPO

    shipped = NodulePredictor(REPO / "apps" / "thyroid_nodule" / "model" / "pretrained_classify_nodule.pt", device="cpu",
                              **{k: load_config("inference")["inference"][k] for k in ("precision", "channels_last")},
                              compile="background")  # the served configuration
    assert shipped.wait_compiled() == "ready"
    image = load_image(frames[0])
    for _ in range(3):
        shipped.predict(image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        shipped.predict(image)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 500, f"{faults:.0f} page faults per frame"


def test_serving_does_not_import_the_training_engine():
    """The served path (inference, compiled networks, runtime helpers) stays off the training
    stack: importing it must not load :mod:`thyroid_plugin.engine`."""
    import subprocess
    import sys

    code = "import sys, thyroid_plugin.inference; print('thyroid_plugin.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
