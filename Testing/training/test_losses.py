"""Distillation losses on hand-computed cases, their invariants (zero at equality, per-voxel normalisation, gradients
reach the student and never the teacher), the spec parser and the Distiller."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.training.distiller import Distiller
from KDSegmentationLib.training.feature_losses import channel_wise_kl
from KDSegmentationLib.training.losses import LOSSES, CompositeLoss, build_losses, kl_per_voxel, parse_loss_spec
from KDSegmentationLib.models.networks import build_network

CH_S = {"enc1": 4, "bottleneck": 6, "dec1": 4}
CH_T = {"enc1": 8, "bottleneck": 12, "dec1": 8}
COMMON = dict(student_channels=CH_S, teacher_channels=CH_T, spatial_dims=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _logits_from_probs(*probs):
    """(C,) probabilities -> (1, C, 1, 1) logits (log-probabilities: softmax gives the probabilities back)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).reshape(1, -1, 1, 1)


def _features(channels, size=(8, 8), batch=2, requires_grad=False):
    out = {}
    for n, c in channels.items():
        stride = 4 if n == "bottleneck" else 2
        out[n] = torch.randn(batch, c, *(s // stride for s in size), requires_grad=requires_grad)
    return out


def _identity_adapters(loss):
    """Make every 1x1 adapter copy the first student channels into the teacher's."""
    for conv in loss.adapters.values():
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            for i in range(min(conv.in_channels, conv.out_channels)):
                conv.weight[i, i] = 1.0


# --- the user's worked examples --------------------------------------------------------------------------------

def test_worked_softmax_examples():
    """The quoted examples were softmax(0.8, -1.2) ~ (0.82, 0.18) and at T=2 ~ (0.71, 0.29). The exact values are
    (0.881, 0.119) and (0.731, 0.269): a logit gap of 2 gives sigmoid(2) = 0.881 and sigmoid(1) = 0.731. (No pair of
    logits gives both quoted values: 0.82 needs a gap of 1.52, 0.71 at T=2 a gap of 1.79.) What the examples
    illustrate holds: the temperature softens the distribution towards uniform, by about the quoted amount."""
    z = torch.tensor([0.8, -1.2])
    p1, p2 = F.softmax(z, 0), F.softmax(z / 2, 0)
    assert torch.allclose(p1, torch.tensor([1 / (1 + math.exp(-2)), 1 - 1 / (1 + math.exp(-2))]), atol=1e-6)
    assert torch.allclose(p1, torch.tensor([0.881, 0.119]), atol=1e-3)
    assert torch.allclose(p2, torch.tensor([0.731, 0.269]), atol=1e-3)
    assert torch.allclose(p1, torch.tensor([0.82, 0.18]), atol=0.07)   # the quoted, rounded examples
    assert torch.allclose(p2, torch.tensor([0.71, 0.29]), atol=0.03)
    assert p2[0] < p1[0]


def test_worked_kl_example_direction():
    teacher = _logits_from_probs(0.8, 0.2)
    student = _logits_from_probs(0.7, 0.3)
    expected = 0.8 * math.log(0.8 / 0.7) + 0.2 * math.log(0.2 / 0.3)  # KL(teacher || student) = 0.0257 nats
    assert abs(kl_per_voxel(student, teacher).item() - expected) < 1e-6
    assert 0.02 <= expected < 0.03
    reverse = 0.7 * math.log(0.7 / 0.8) + 0.3 * math.log(0.3 / 0.2)      # 0.0282: the other direction differs
    assert abs(kl_per_voxel(teacher, student).item() - reverse) < 1e-6


def test_kd_formula_hand_computed():
    t, a = 2.0, 0.3
    zs = torch.tensor([0.8, -1.2]).reshape(1, 2, 1, 1)
    zt = torch.tensor([1.5, -0.5]).reshape(1, 2, 1, 1)
    ps, pt = F.softmax(zs / t, 1).flatten(), F.softmax(zt / t, 1).flatten()
    kl = float((pt * (pt.log() - ps.log())).sum())
    kd = LOSSES["kd"](alpha=a, temperature=t)
    # without labels: T^2 KL with weight 1
    assert kd(zs, zt, None).item() == pytest.approx(t * t * kl, rel=1e-5)
    # with labels: (1 - alpha) L_seg + alpha T^2 KL
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    seg = LOSSES["seg"]()(zs, None, target).item()
    assert kd(zs, zt, target).item() == pytest.approx((1 - a) * seg + a * t * t * kl, rel=1e-5)


# --- hand-computed cases of the other losses ------------------------------------------------------------------

def test_soft_ce_hand_computed_and_minimum_is_teacher_entropy():
    t = 2.0
    zt = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1)
    q = F.softmax(zt / t, 1).flatten()
    loss = LOSSES["soft_ce"](temperature=t)
    zs = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1)
    assert loss(zs, zt).item() == pytest.approx(-t * t * float((q * math.log(0.5)).sum()), rel=1e-5)
    # at equality: T^2 H(q), and the gradient vanishes (minimum)
    same = zt.clone().requires_grad_(True)
    value = loss(same, zt)
    value.backward()
    assert value.item() == pytest.approx(-t * t * float((q * q.log()).sum()), rel=1e-5)
    assert same.grad.abs().max() < 1e-6


def test_hard_label_uses_teacher_argmax():
    zt = torch.tensor([[0.1, 2.0], [3.0, -1.0]]).T.reshape(1, 2, 1, 2)      # argmax: class 1, class 0
    zs = torch.zeros(1, 2, 1, 2)
    assert LOSSES["hard_label"]()(zs, zt).item() == pytest.approx(math.log(2), rel=1e-6)
    confident = 20 * zt                                                     # equal and confident: near zero
    assert LOSSES["hard_label"]()(confident, confident).item() < 1e-6
    assert LOSSES["hard_label"](dice=True)(confident, confident).item() < 1e-3


def test_cwd_hand_computed():
    # one channel, two positions: spatial distributions (0.8, 0.2) teacher, (0.7, 0.3) student, tau 1
    zt = torch.log(torch.tensor([0.8, 0.2])).reshape(1, 1, 1, 2)
    zs = torch.log(torch.tensor([0.7, 0.3])).reshape(1, 1, 1, 2)
    expected = 0.8 * math.log(0.8 / 0.7) + 0.2 * math.log(0.2 / 0.3)
    assert channel_wise_kl(zs, zt, 1.0).item() == pytest.approx(expected, rel=1e-5)
    tau = 4.0
    assert LOSSES["cwd"](tau=tau)(zs, zt).item() == pytest.approx(
        tau * tau * channel_wise_kl(zs / tau, zt / tau, 1.0).item(), rel=1e-5)


def test_affinity_hand_computed():
    # two positions; teacher features orthogonal (affinity = identity), student parallel (affinity = all ones)
    ft = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    fs = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    loss = LOSSES["affinity"](pool_size=1)
    assert loss(fs, ft).item() == pytest.approx(0.5)   # two off-diagonal entries differ by 1, mean over 4
    assert loss(ft, ft).item() == pytest.approx(0.0, abs=1e-7)


def test_hint_hand_computed():
    loss = LOSSES["hint"](feature_pairs=[("bottleneck", "bottleneck")], **COMMON)
    for conv in loss.adapters.values():
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    fs, ft = _features(CH_S), _features(CH_T)
    assert loss(None, None, None, fs, ft).item() == pytest.approx(ft["bottleneck"].square().mean().item(), rel=1e-5)


# --- invariants -----------------------------------------------------------------------------------------------

def test_losses_vanish_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 8, 8)
    assert LOSSES["kd"]()(z, z, None).item() == pytest.approx(0.0, abs=1e-6)
    assert LOSSES["cwd"]()(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert LOSSES["affinity"](pool_size=2)(z, z).item() == pytest.approx(0.0, abs=1e-6)
    # feature losses: identical features through identity adapters
    ch = {"enc1": 4, "bottleneck": 6}
    f = _features(ch)
    hint = LOSSES["hint"](student_channels=ch, teacher_channels=ch, spatial_dims=2)
    cwd = LOSSES["cwd"](on_features=True, student_channels=ch, teacher_channels=ch, spatial_dims=2)
    aff = LOSSES["affinity"](on_features=True, pool_size=1, student_channels=ch, teacher_channels=ch)
    _identity_adapters(hint)
    _identity_adapters(cwd)
    assert hint(z, z, None, f, f).item() == pytest.approx(0.0, abs=1e-7)
    assert cwd(z, z, None, f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert aff(z, z, None, f, f).item() == pytest.approx(0.0, abs=1e-6)
    # seg: a confident correct prediction costs almost nothing; no labels, nothing at all
    labels = torch.randint(0, 3, (2, 8, 8))
    perfect = 30 * F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert LOSSES["seg"]()(perfect, None, labels).item() < 1e-3
    assert LOSSES["seg"]()(z, None, None).item() == 0.0


@pytest.mark.parametrize("name", ["kd", "soft_ce", "cwd"])
def test_per_voxel_normalisation(name):
    """Tiling the same per-voxel distributions over a 4x larger image must not change the value (cwd: its spatial
    KL compares whole maps, so tiling keeps it the same too)."""
    torch.manual_seed(1)
    zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss = LOSSES[name]()
    small = loss(zs, zt, None).item()
    big = loss(zs.repeat(1, 1, 2, 2), zt.repeat(1, 1, 2, 2), None).item()
    assert big == pytest.approx(small, rel=1e-4)
    if name == "kd":  # a 'batchmean' KL would have grown with the number of voxels
        batchmean = F.kl_div(F.log_softmax(zs.repeat(1, 1, 2, 2), 1), F.log_softmax(zt.repeat(1, 1, 2, 2), 1),
                             reduction="batchmean", log_target=True).item()
        assert batchmean == pytest.approx(64 * kl_per_voxel(zs, zt).item(), rel=1e-4)


def test_kd_3d_and_per_voxel():
    torch.manual_seed(2)
    zs, zt = torch.randn(1, 3, 2, 3, 4), torch.randn(1, 3, 2, 3, 4)
    kd = LOSSES["kd"](temperature=1.0)
    assert kd(zs, zt, None).item() == pytest.approx(kd(zs.repeat(1, 1, 3, 1, 2), zt.repeat(1, 1, 3, 1, 2), None)
                                                    .item(), rel=1e-4)


@pytest.mark.parametrize("spec", ["seg", "kd", "soft_ce", "hard_label", "hint", "cwd", "affinity",
                                  {"cwd": {"on_features": True}}, {"affinity": {"on_features": True}},
                                  {"hard_label": {"dice": True}}])
def test_gradients_reach_student_and_adapters_never_teacher(spec):
    torch.manual_seed(3)
    loss = build_losses(spec, **COMMON)
    zs = torch.randn(2, 3, 8, 8, requires_grad=True)
    zt = torch.randn(2, 3, 8, 8, requires_grad=True)
    fs, ft = _features(CH_S, requires_grad=True), _features(CH_T, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    total, parts = loss(zs, zt, target, fs, ft)
    total.backward()
    assert zt.grad is None and all(f.grad is None for f in ft.values())
    if loss.needs_features:
        assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in fs.values())
        params = list(loss.parameters())
        assert all(p.grad is not None for p in params)
        assert params or "affinity" in loss.losses   # cosine affinities need no adapters
    else:
        assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in parts.values())


# --- seg loss targets -----------------------------------------------------------------------------------------

def test_seg_soft_one_hot_target_equals_hard_target():
    torch.manual_seed(4)
    z = torch.randn(2, 3, 6, 5)
    labels = torch.randint(0, 3, (2, 6, 5))
    soft = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    seg = LOSSES["seg"]()
    hard = seg(z, None, labels).item()
    assert seg(z, None, labels.unsqueeze(1)).item() == pytest.approx(hard, rel=1e-6)
    assert seg(z, None, soft).item() == pytest.approx(hard, rel=1e-5)
    # reader-consensus soft labels (e.g. 2 of 4 readers) give a finite, different value
    mixed = 0.5 * soft + 0.5 * F.one_hot(torch.zeros_like(labels), 3).permute(0, 3, 1, 2).float()
    assert math.isfinite(seg(z, None, mixed).item())
    with pytest.raises(ValueError, match="does not match"):
        seg(z, None, torch.zeros(2, 7, 5, dtype=torch.long))


def test_seg_without_labels_is_zero_but_backpropagates():
    z = torch.randn(1, 2, 4, 4, requires_grad=True)
    total, parts = build_losses("seg")(z, None, None)
    total.backward()
    assert parts["seg"].item() == 0.0 and z.grad is not None


def test_affinity_caps_positions_for_3d():
    loss = LOSSES["affinity"](pool_size=2, max_positions=100)
    assert math.prod(loss._grid((96, 96, 64))) <= 100
    z = torch.randn(1, 3, 16, 16, 12)
    assert loss(z, z.flip(2)).item() >= 0.0


# --- spec parser and composite ----------------------------------------------------------------------------------

def test_parse_spec_forms():
    assert parse_loss_spec("kd=1.0,hint=0.5") == {"kd": {"weight": 1.0}, "hint": {"weight": 0.5}}
    assert parse_loss_spec("kd") == {"kd": {"weight": 1.0}}
    assert parse_loss_spec('{"kd": 2, "cwd": {"weight": 0.5, "tau": 1}}') == {
        "kd": {"weight": 2.0}, "cwd": {"weight": 0.5, "tau": 1}}
    with pytest.raises(InputError, match="unknown loss"):
        parse_loss_spec("kd=1,fancy=2")
    with pytest.raises(InputError, match="not a number"):
        parse_loss_spec("kd=x")
    with pytest.raises(InputError, match="no option"):
        build_losses({"kd": {"weight": 1, "tau": 3}})


def test_build_losses_routes_common_options_and_sums_weights():
    loss = build_losses("kd=1.0,cwd=0.25,hint=0.5", alpha=0.2, temperature=3.0, **COMMON)
    assert isinstance(loss, CompositeLoss)
    assert loss.losses["kd"].temperature == 3.0 and loss.losses["kd"].alpha == 0.2
    assert loss.losses["cwd"].tau == 4.0                       # 'temperature' is the KD's, not CWD's
    assert loss.needs_features and loss.needs_teacher
    assert len(list(loss.parameters())) == 2 * len(loss.losses["hint"].pairs)   # adapters: weight + bias
    # default hint pairs: every common name except full resolution
    assert loss.losses["hint"].pairs == [("enc1", "enc1"), ("bottleneck", "bottleneck"), ("dec1", "dec1")]
    torch.manual_seed(5)
    zs, zt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    total, parts = loss(zs, zt, None, _features(CH_S), _features(CH_T))
    assert set(parts) == {"kd", "cwd", "hint"}
    assert total.item() == pytest.approx(float(parts["kd"] + 0.25 * parts["cwd"] + 0.5 * parts["hint"]), rel=1e-5)
    with pytest.raises(ValueError, match="student has no feature"):
        build_losses({"hint": {"feature_pairs": [["nope", "enc1"]]}}, **COMMON)


# --- distiller --------------------------------------------------------------------------------------------------

def _tiny_pair(spatial_dims=2):
    student = build_network("student_mobile", spatial_dims=spatial_dims, in_channels=1, out_channels=2, width=4,
                            depth=2, full_res_channels=4)
    teacher = build_network("teacher_unet", spatial_dims=spatial_dims, in_channels=1, out_channels=2,
                            filters=[4, 8, 16])
    return student, teacher


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_distiller_keeps_teacher_frozen_and_learns(spatial_dims):
    torch.manual_seed(6)
    student, teacher = _tiny_pair(spatial_dims)
    losses = build_losses("kd=1.0,hint=0.5,affinity=0.1", spatial_dims=spatial_dims,
                          student_channels=student.feature_channels, teacher_channels=teacher.feature_channels)
    distiller = Distiller(student, teacher, losses).train()
    assert not teacher.training and student.training
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    size = [12] * 2 if spatial_dims == 2 else [8] * 3
    x = torch.rand(2, 1, *size)
    target = torch.randint(0, 2, (2, *size))
    values = []
    for _ in range(6):
        logits, parts, total = distiller(x, target)
        assert logits.shape == (2, 2, *x.shape[2:]) and set(parts) == {"kd", "hint", "affinity"}
        opt.zero_grad()
        total.backward()
        opt.step()
        values.append(total.item())
    assert values[-1] < values[0]
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    distiller.train(True)
    assert not teacher.training
    n_adapters = sum(p.numel() for p in losses.parameters())
    assert sum(p.numel() for p in distiller.trainable_parameters()) == \
        sum(p.numel() for p in student.parameters()) + n_adapters


def test_distiller_without_teacher_for_plain_training():
    student, _ = _tiny_pair()
    distiller = Distiller(student, None, build_losses("seg"))
    logits, parts, total = distiller(torch.rand(1, 1, 9, 11), torch.randint(0, 2, (1, 9, 11)))
    assert logits.shape == (1, 2, 9, 11) and total.item() > 0
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(student, None, build_losses("kd"))
