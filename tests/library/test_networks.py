"""The saliency-guided dual-attention classifier: shapes, size, cost, borders and gradient flow."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from thyroid_plugin.losses import SaliencyGuidedLoss
from thyroid_plugin.networks import (
    DEMLP,
    ClassifierOutput,
    DualAttentionFusion,
    SaliencyGuidedClassifier,
    SaliencyNet,
    TwoBranchEncoder,
)


@pytest.fixture(scope="module")
def default_net() -> SaliencyGuidedClassifier:
    torch.manual_seed(0)
    return SaliencyGuidedClassifier().eval()


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (97, 131), (224, 224), (300, 300)])
def test_output_shapes_for_any_input_size(default_net, hw):
    batch = 2 if hw[0] * hw[1] <= 224 * 224 else 1
    x = torch.rand(batch, 3, *hw)
    with torch.no_grad():
        out = default_net(x)
    assert isinstance(out, ClassifierOutput)
    assert out._fields == ("logits", "saliency_logits", "embedding", "saliency_embedding")
    assert out.logits.shape == (batch, 2)
    assert out.saliency_logits.shape == (batch, 1, *hw)  # saliency at the input's own resolution
    assert out.embedding.shape == (batch, 512)
    assert out.saliency_embedding.shape == (batch, 64)
    for t in out:
        assert torch.isfinite(t).all()


def test_named_outputs_are_the_tuple_entries(default_net):
    with torch.no_grad():
        out = default_net(torch.rand(1, 3, 64, 64))
    assert out.logits is out[0] and out.saliency_logits is out[1]
    assert out.embedding is out[2] and out.saliency_embedding is out[3]


def test_single_branch_variant_has_no_saliency_outputs():
    net = SaliencyGuidedClassifier(variant="single_branch").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 80))
    assert out.logits.shape == (1, 2) and out.embedding.shape == (1, 512)
    assert out.saliency_logits is None and out.saliency_embedding is None
    with pytest.raises(ValueError, match="variant"):
        SaliencyGuidedClassifier(variant="triple")


def test_default_parameter_count(default_net):
    assert sum(p.numel() for p in default_net.parameters()) == 10_262_933


def test_default_flops_per_224_image(default_net):
    x = torch.rand(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        default_net(x)
    counts = counter.get_flop_counts()["Global"]
    conv_matmul = sum(v for op, v in counts.items() if any(s in str(op) for s in ("convolution", "mm", "matmul", "linear")))
    assert conv_matmul == pytest.approx(14.2e9, rel=0.01)


def test_construction_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    SaliencyGuidedClassifier()
    SaliencyGuidedClassifier(variant="single_branch")
    assert sorted(os.listdir(tmp_path)) == before == []


def test_network_def_rebuilds_the_same_architecture(default_net):
    spec = default_net.network_def()
    assert spec["_target_"] == "thyroid_plugin.networks.SaliencyGuidedClassifier"
    rebuilt = SaliencyGuidedClassifier(**{k: v for k, v in spec.items() if k != "_target_"})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in default_net.state_dict().items()}


@pytest.mark.parametrize("hw", [(31, 64), (64, 16), (8, 8)])
def test_too_small_inputs_raise_a_clear_value_error(default_net, hw):
    with pytest.raises(ValueError, match="at least 32x32"):
        default_net(torch.rand(1, 3, *hw))


# ------------------------------------------------------------------------- dual-attention fusion
@pytest.mark.parametrize("size", [9, 10, 11, 13])
def test_spatial_attention_keeps_the_border_when_size_is_not_a_multiple_of_4(size):
    fusion = DualAttentionFusion(channels=1, patch_size=4)
    c = 3.0
    x = torch.zeros(1, 1, size, size)
    x[..., -1, :] = c  # only the last (partial-patch) row carries signal
    y = fusion.spatial_attention(x)
    # the last patch row holds size % 4 rows; its mean at the bottom row is (c * 1 row) / (size % 4 rows)
    partial = size % 4
    expected_attn = torch.sigmoid(torch.tensor(c / partial))
    # a pooling that drops the partial patch sees only zeros there: attention sigmoid(0) = 0.5
    assert y[0, 0, -1, -1].item() == pytest.approx(c * expected_attn.item(), rel=1e-5)
    assert abs(y[0, 0, -1, -1].item() - c * 0.5) > 0.1


def test_fusion_output_depends_on_the_last_row_through_the_attention():
    torch.manual_seed(0)
    fusion = DualAttentionFusion(channels=4, patch_size=4).eval()
    a = torch.rand(1, 4, 13, 15)
    b = a.clone()
    b[..., -1, :] += 2.0  # maps differ in the last row only
    e = torch.rand(1, 4, 13, 15)
    ya, yb = fusion(a, e), fusion(b, e)
    assert ya.shape == (1, 4, 13, 15)
    assert not torch.allclose(ya[..., -1, :], yb[..., -1, :])
    # spatial attention weights of the bottom patch row change too (not only the pass-through of x)
    attn_a = fusion.spatial_attention(torch.cat((a, e), 1))[:, :4] / torch.cat((a, e), 1)[:, :4]
    attn_b = fusion.spatial_attention(torch.cat((b, e), 1))[:, :4] / torch.cat((b, e), 1)[:, :4]
    assert not torch.allclose(attn_a[..., -1, :], attn_b[..., -1, :])


def test_fusion_channel_attention_damps_flat_channels():
    x = torch.zeros(1, 2, 8, 8)
    x[:, 0] = 1.0  # flat channel: variance 0 -> weight sigmoid(0) = 0.5
    x[:, 1, :, :4] = 4.0  # varying channel: weight sigmoid(var) > 0.5
    y = DualAttentionFusion.channel_attention(x)
    assert torch.allclose(y[:, 0], torch.full((8, 8), 0.5))
    var = x[:, 1].var()
    assert torch.allclose(y[:, 1], x[:, 1] * torch.sigmoid(var))


def test_blocks_and_encoder_shapes():
    x = torch.rand(2, 24, 7, 9)
    assert DEMLP(24, 40)(x).shape == (2, 40, 7, 9)
    with pytest.raises(ValueError):
        DEMLP(5, 8)
    enc = TwoBranchEncoder(3, 8, 4, 4)
    feature, last = enc(torch.rand(1, 3, 50, 37), torch.rand(1, 3, 50, 37))
    # ceil-mode pooling keeps odd borders: 50 -> 25 -> 13 -> 7 ; 37 -> 19 -> 10 -> 5
    assert feature.shape == (1, 64) and last.shape == (1, 64, 7, 5)
    logits, emb = SaliencyNet()(torch.rand(1, 3, 45, 70))
    assert logits.shape == (1, 1, 45, 70) and emb.shape == (1, 64)


# ---------------------------------------------------------------------------------- gradient flow
def test_gradients_reach_every_part_after_the_full_loss():
    torch.manual_seed(0)
    net = SaliencyGuidedClassifier()
    x = torch.rand(2, 3, 32, 48)
    parts = SaliencyGuidedLoss("wellposed", class_weights="balanced")
    parts.set_class_balance([1, 1])
    out = parts(net(x), x, torch.tensor([0, 1]))
    out["loss"].backward()

    def grad_norm(module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    enc = net.encoder
    groups = {
        "image branch": enc.image_stages,
        "enhanced branch": enc.enhanced_stages,
        "fusions": enc.fusions,
        "head": net.head,
        "saliency network": net.saliency,
        "saliency projection": net.saliency_projection,
    }
    for name, module in groups.items():
        assert grad_norm(module) > 0, f"no gradient reaches the {name}"
    for i, fusion in enumerate(enc.fusions):
        assert grad_norm(fusion) > 0, f"no gradient reaches fusion {i}"
    for i, stage in enumerate(enc.enhanced_stages):
        assert grad_norm(stage) > 0, f"no gradient reaches enhanced stage {i}"
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_saliency_network_is_trained_by_the_classification_loss_alone():
    # with form="none" the saliency network still learns, through the enhanced branch and its embedding
    torch.manual_seed(0)
    net = SaliencyGuidedClassifier()
    x = torch.rand(2, 3, 32, 32)
    SaliencyGuidedLoss("none")(net(x), x, torch.tensor([0, 1]))["loss"].backward()
    assert sum(float(p.grad.abs().sum()) for p in net.saliency.parameters()) > 0
