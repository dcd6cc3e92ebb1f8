"""Training loss: the reference saliency terms pinned by independent computations, their
degeneracy, the well-posed terms on synthetic nodules, and the combination with CE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thyroid_plugin.losses import (
    REFERENCE_WEIGHTS,
    WELLPOSED_WEIGHTS,
    SaliencyGuidedLoss,
    reference_affinity,
    reference_boundary,
    reference_reconstruction,
    wellposed_boundary,
    wellposed_prior,
    wellposed_reconstruction,
)
from thyroid_plugin.networks import ClassifierOutput

# a 1x3x4x4 image and a 1x1x4x4 mask with easy decimal values
IMAGE = np.array(
    [
        [[0.0, 0.2, 0.4, 0.6], [0.1, 0.3, 0.5, 0.7], [0.9, 0.8, 0.7, 0.6], [0.0, 0.0, 1.0, 1.0]],
        [[0.2, 0.2, 0.2, 0.2], [0.4, 0.4, 0.4, 0.4], [0.6, 0.6, 0.6, 0.6], [0.8, 0.8, 0.8, 0.8]],
        [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.9, 0.0]],
    ]
)
MASK = np.array([[0.0, 0.0, 0.5, 1.0], [0.0, 0.25, 0.75, 1.0], [0.0, 0.5, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]])


def _t(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a, dtype=np.float64)
    while a.ndim < 4:
        a = a[None]
    return torch.from_numpy(a)


# ---------------------------------------------------------------- independent numpy reference terms
SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def _correlate(x: np.ndarray, k: np.ndarray, pad: str = "constant") -> np.ndarray:
    """3x3 correlation, same size; ``pad``: numpy's mode (``constant`` = zeros, ``edge`` = replicate)."""
    h, w = x.shape
    p = np.pad(x, 1, mode=pad)
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[i, j] = sum(k[a, b] * p[i + a, j + b] for a in range(3) for b in range(3))
    return out


def _np_boundary(gray: np.ndarray, mask: np.ndarray) -> float:
    terms = 0.0
    for k in (SOBEL_X, SOBEL_X.T):
        terms += np.abs(_correlate(gray, k) - _correlate(mask, k)).mean()
    return terms


def _np_grad_magnitude(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    g = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if i + 1 < h:
                g[i, j] += abs(x[i + 1, j] - x[i, j])
            if j + 1 < w:
                g[i, j] += abs(x[i, j + 1] - x[i, j])
    return g / (g.mean() + 1e-8)


def _np_affinity(gray: np.ndarray, mask: np.ndarray) -> float:
    return float(((_np_grad_magnitude(gray) - _np_grad_magnitude(mask)) ** 2).mean())


def test_reference_reconstruction_value():
    expected = np.abs(IMAGE * MASK[None] - IMAGE).mean()  # L1(x * m, x) over all 48 values
    assert reference_reconstruction(_t(IMAGE), _t(MASK)).item() == pytest.approx(expected, abs=1e-12)
    # by hand: a 0.5 image kept at 25 % loses 0.375 everywhere
    assert reference_reconstruction(torch.full((1, 3, 4, 4), 0.5), torch.full((1, 1, 4, 4), 0.25)).item() == pytest.approx(0.375)


def test_reference_boundary_value():
    gray = IMAGE.mean(axis=0)
    assert reference_boundary(_t(IMAGE), _t(MASK)).item() == pytest.approx(_np_boundary(gray, MASK), abs=1e-10)


def test_reference_boundary_by_hand_on_a_single_bright_pixel():
    # the gray image is 0 except one interior pixel of 3 (all channels): its Sobel responses are the
    # kernel itself (mirrored), so the L1 to an empty mask is sum|kx| / 16 + sum|ky| / 16 = 3 * 8/16 * 2
    image = torch.zeros(1, 3, 4, 4)
    image[..., 1, 1] = 3.0
    assert reference_boundary(image, torch.zeros(1, 1, 4, 4)).item() == pytest.approx(3.0)


def test_reference_affinity_value():
    gray = IMAGE.mean(axis=0)
    assert reference_affinity(_t(IMAGE), _t(MASK)).item() == pytest.approx(_np_affinity(gray, MASK), abs=1e-10)


def test_reference_affinity_by_hand_on_a_step_edge():
    # a vertical step between columns 1 and 2: forward differences are 1 on column 1, 0 elsewhere;
    # mean-normalised that column is 4 (16 pixels / 4 edge pixels); an empty mask gives 0, so
    # MSE = 4 pixels * 4**2 / 16 pixels = 4
    image = torch.zeros(1, 3, 4, 4)
    image[..., 2:] = 1.0
    assert reference_affinity(image, torch.zeros(1, 1, 4, 4)).item() == pytest.approx(4.0, rel=1e-6)


def test_reference_degeneracy():
    image = _t(IMAGE).float()
    gray = image.mean(dim=1, keepdim=True)
    # an all-ones mask reconstructs the image perfectly ...
    assert reference_reconstruction(image, torch.ones_like(gray)).item() == 0.0
    # ... and a mask that copies the gray image has no boundary or affinity cost at all
    assert reference_boundary(image, gray).item() == pytest.approx(0.0, abs=1e-7)
    assert reference_affinity(image, gray).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- well-posed form
def _synthetic_nodule(size: int, cy: int, cx: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark disc ("nodule") in textured tissue with multiplicative speckle; image (1,3,S,S), mask (1,1,S,S)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nodule = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)
    tissue = 0.55 + 0.1 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    image = np.where(nodule > 0, 0.2, tissue) * rng.gamma(4.0, 0.25, (size, size))
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1), torch.from_numpy(nodule)[None, None]


def _output_with_mask(mask: torch.Tensor) -> ClassifierOutput:
    logits = torch.logit(mask.clamp(1e-4, 1 - 1e-4))
    return ClassifierOutput(torch.zeros(mask.shape[0], 2), logits, torch.zeros(1, 4), torch.zeros(1, 4))


SCENES = [(64, 32, 32, 12, 0), (96, 40, 55, 15, 1), (80, 30, 45, 8, 2), (128, 70, 50, 30, 3), (112, 56, 60, 24, 4)]


@pytest.mark.parametrize("scene", SCENES, ids=[f"{s[0]}px-r{s[3]}" for s in SCENES])
def test_wellposed_scores_the_nodule_below_every_trivial_mask(scene):
    image, nodule = _synthetic_nodule(*scene)
    gray = image.mean(dim=1, keepdim=True)
    loss = SaliencyGuidedLoss("wellposed")
    target = torch.tensor([0])

    def saliency_cost(mask):
        parts = loss(_output_with_mask(mask), image, target)
        return float(parts["loss"] - parts["ce"])

    truth = saliency_cost(nodule)
    trivial = {
        "all ones": torch.ones_like(nodule),
        "all zeros": torch.zeros_like(nodule),
        "constant 0.5": torch.full_like(nodule, 0.5),
        "image copy": gray,
        "inverse image": 1 - gray,
        "inverted nodule": 1 - nodule,
    }
    for name, mask in trivial.items():
        assert truth < saliency_cost(mask), f"{name} scores as well as the nodule"


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 1.0])
def test_wellposed_reconstruction_is_one_for_any_constant_mask(value):
    image, _ = _synthetic_nodule(64, 30, 34, 10, 5)
    assert wellposed_reconstruction(image, torch.full((1, 1, 64, 64), value)).item() == pytest.approx(1.0, abs=1e-4)


def _np_smooth(gray: np.ndarray) -> np.ndarray:
    # documented definition: 5x5 box blur, edge-replicated
    p = np.pad(gray, 2, mode="edge")
    return np.array([[p[i : i + 5, j : j + 5].mean() for j in range(gray.shape[1])] for i in range(gray.shape[0])])


def _np_wellposed_reconstruction(gray: np.ndarray, mask: np.ndarray) -> float:
    # a two-region fit of the smoothed image normalised by its variance
    g = _np_smooth(gray)
    mu_in = (mask * g).sum() / mask.sum()
    mu_out = ((1 - mask) * g).sum() / (1 - mask).sum()
    energy = (mask * (g - mu_in) ** 2 + (1 - mask) * (g - mu_out) ** 2).sum()
    return float(energy / ((g - g.mean()) ** 2).sum())


def test_wellposed_reconstruction_prefers_the_true_region_to_a_shifted_one():
    image = torch.full((1, 3, 40, 40), 0.8)
    image[..., 10:30, 10:30] = 0.1
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 10:30, 10:30] = 1.0
    shifted = torch.roll(mask, shifts=(4, 4), dims=(2, 3))
    assert wellposed_reconstruction(image, mask).item() < wellposed_reconstruction(image, shifted).item() < 1.0


def _np_wellposed_boundary(gray: np.ndarray, mask: np.ndarray) -> float:
    # documented definition: edge-replicated Sobel of the smoothed image and of the mask
    g = _np_smooth(gray)
    edge = np.sqrt(_correlate(g, SOBEL_X, "edge") ** 2 + _correlate(g, SOBEL_X.T, "edge") ** 2 + 1e-8)
    weight = np.exp(-edge / (edge.mean() + 1e-8))
    mask_edge = np.sqrt(_correlate(mask, SOBEL_X, "edge") ** 2 + _correlate(mask, SOBEL_X.T, "edge") ** 2 + 1e-8)
    return float((mask_edge * weight).mean() / 4.0)


@pytest.mark.parametrize(
    "term, numpy_term", [(wellposed_reconstruction, _np_wellposed_reconstruction), (wellposed_boundary, _np_wellposed_boundary)],
    ids=["reconstruction", "boundary"],
)
def test_wellposed_term_value(term, numpy_term):
    rng = np.random.default_rng(7)
    image = rng.random((3, 12, 10))
    mask = rng.random((12, 10))
    expected = numpy_term(image.mean(axis=0), mask)
    assert term(_t(image), _t(mask)).item() == pytest.approx(expected, rel=1e-5)


def test_wellposed_boundary_sees_no_edge_at_the_frame_border():
    # a constant image has no edge anywhere, the frame's border included: a constant mask costs
    # nothing, and a mask edge along the border costs what the same edge costs mid-frame
    image = torch.full((1, 3, 32, 32), 0.6)
    assert wellposed_boundary(image, torch.ones(1, 1, 32, 32)).item() == pytest.approx(0.0, abs=1e-4)

    def step_at(column):
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., column:] = 1.0
        return wellposed_boundary(image, mask).item()

    assert step_at(1) == pytest.approx(step_at(16), rel=1e-6)
    assert step_at(1) > 0.01


def test_wellposed_prior_hand_values():
    # an empty mask: no border saliency, area 0 -> hinge area_min - 0
    assert wellposed_prior(torch.zeros(1, 1, 50, 50), area_min=0.05).item() == pytest.approx(0.05)
    # a full mask: border mean 1, area 1 -> hinge 1 - area_max
    assert wellposed_prior(torch.ones(1, 1, 50, 50), area_max=0.7).item() == pytest.approx(1.0 + 0.3)
    # a centred square of 20 % area, clear of the border band: no cost
    m = torch.zeros(1, 1, 50, 50)
    m[..., 14:36, 14:36] = 1.0  # 22*22/2500 = 0.19
    assert wellposed_prior(m).item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------ combination
def test_loss_combines_terms_with_the_configured_weights():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    out = ClassifierOutput(torch.randn(2, 2), torch.randn(2, 1, 32, 32), torch.zeros(2, 4), torch.zeros(2, 4))
    target = torch.tensor([1, 0])
    weights = {"w_rec": 0.3, "w_aff": 2.0, "w_edge": 0.7, "w_prior": 0.25}
    for form in ("reference", "wellposed"):
        parts = SaliencyGuidedLoss(form, weights=weights)(out, image, target)
        assert parts["ce"].item() == pytest.approx(F.cross_entropy(out.logits, target).item(), rel=1e-6)
        for key in ("rec", "aff", "edge"):
            assert parts[key].item() > 0
        expected = (parts["ce"] + 0.3 * parts["rec"] + 2.0 * parts["aff"] + 0.7 * parts["edge"] + 0.25 * parts["prior"]).item()
        assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
    # the reference terms are the reference functions of sigmoid(logits)
    parts = SaliencyGuidedLoss("reference")(out, image, target)
    mask = torch.sigmoid(out.saliency_logits)
    assert parts["rec"].item() == pytest.approx(reference_reconstruction(image, mask).item(), rel=1e-6)
    assert parts["edge"].item() == pytest.approx(reference_boundary(image, mask).item(), rel=1e-6)
    assert parts["aff"].item() == pytest.approx(reference_affinity(image, mask).item(), rel=1e-6)


def test_default_weights_of_each_form():
    assert SaliencyGuidedLoss("reference").weights == REFERENCE_WEIGHTS == {"w_rec": 0.5, "w_aff": 1.0, "w_edge": 0.01, "w_prior": 0.0}
    assert SaliencyGuidedLoss("wellposed").weights == WELLPOSED_WEIGHTS
    partial = SaliencyGuidedLoss("reference", weights={"w_edge": 0.2}).weights
    assert partial == {**REFERENCE_WEIGHTS, "w_edge": 0.2}
    with pytest.raises(ValueError, match="w_typo"):
        SaliencyGuidedLoss("wellposed", weights={"w_typo": 1.0})
    with pytest.raises(ValueError, match="form"):
        SaliencyGuidedLoss("bogus")


def test_form_none_is_plain_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(4, 2)
    out = ClassifierOutput(logits, torch.randn(4, 1, 32, 32), torch.zeros(4, 4), torch.zeros(4, 4))
    target = torch.tensor([0, 1, 1, 0])
    parts = SaliencyGuidedLoss("none")(out, torch.rand(4, 3, 32, 32), target)
    ce = -torch.log_softmax(logits, dim=1)[torch.arange(4), target].mean()
    assert parts["loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["rec"].item() == parts["aff"].item() == parts["edge"].item() == parts["prior"].item() == 0.0


def test_balanced_class_weights():
    loss = SaliencyGuidedLoss("none", class_weights="balanced")
    loss.set_class_balance([30, 10])  # N / (K n_k): 40/60, 40/20
    assert torch.allclose(loss.class_weights, torch.tensor([2.0 / 3.0, 2.0]))
    torch.manual_seed(2)
    logits = torch.randn(3, 2)
    target = torch.tensor([0, 1, 1])
    out = ClassifierOutput(logits, None, torch.zeros(3, 4), None)
    nll = -torch.log_softmax(logits, dim=1)[torch.arange(3), target]
    w = torch.tensor([2.0 / 3.0, 2.0])[target]
    assert loss(out, torch.rand(3, 3, 32, 32), target)["loss"].item() == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-6)
    # a class absent from the training labels does not divide by zero
    loss.set_class_balance([5, 0])
    assert torch.isfinite(loss.class_weights).all()
    # explicit weights are used as given
    fixed = SaliencyGuidedLoss("none", class_weights=[1.0, 3.0])
    w = torch.tensor([1.0, 3.0])[target]
    assert fixed(out, torch.rand(3, 3, 32, 32), target)["loss"].item() == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-6)


def test_saliency_terms_are_skipped_for_the_single_branch_variant():
    out = ClassifierOutput(torch.zeros(1, 2), None, torch.zeros(1, 4), None)
    parts = SaliencyGuidedLoss("wellposed")(out, torch.rand(1, 3, 32, 32), torch.tensor([1]))
    assert parts["loss"].item() == pytest.approx(math.log(2.0), rel=1e-6)
