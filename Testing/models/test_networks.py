"""Teacher and student networks: any input size, named features that pair by stride, sizes of the shipped configs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.networks import (ARCHITECTURES, build_network, count_parameters, default_arch_args)
from KDSegmentationLib.models.student import ConvNormAct

TASKS = ("liver", "lung_nodule", "retina")

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# small configurations: the contract does not depend on width, and these run in milliseconds
SMALL = {
    "teacher_unet": {"filters": [4, 8, 12]},
    "student_mobile": {"width": 4, "depth": 3, "full_res_channels": 4},
}


def _small(arch, spatial_dims, in_channels=1, out_channels=3, **extra):
    args = dict(SMALL[arch], spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels)
    args.update(extra)
    return build_network(arch, **args)


def test_registry_names():
    assert {"teacher_unet", "student_mobile"} <= set(ARCHITECTURES)
    with pytest.raises(InputError, match="unknown network architecture"):
        build_network("no_such_net")


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("size", [(37, 45), (16, 16), (1, 7), (19, 23, 17), (8, 9, 5)])
def test_output_size_equals_input_size(arch, size):
    net = _small(arch, len(size), in_channels=2).eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *size)
    assert net.spatial_dims == len(size)


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("size", [(37, 45), (19, 23, 17)])
def test_features_match_feature_channels_and_strides(arch, size):
    net = _small(arch, len(size)).eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(1, 1, *size), return_features=True)
    assert logits.shape[2:] == size
    assert list(feats) == list(net.feature_channels) == list(net.feature_strides)
    for name, f in feats.items():
        stride = net.feature_strides[name]
        assert f.shape[:2] == (1, net.feature_channels[name]), name
        assert tuple(f.shape[2:]) == tuple(math.ceil(n / stride) for n in size), name
    assert "bottleneck" in feats and feats["bottleneck"].shape[2:] == tuple(math.ceil(n / 2 ** net.depth)
                                                                            for n in size)


@pytest.mark.parametrize("full_res", [0, 4])
@pytest.mark.parametrize("stem_stride", [1, 2, 4])
def test_student_variants(stem_stride, full_res):
    net = build_network("student_mobile", spatial_dims=2, in_channels=3, out_channels=2, width=4, depth=3,
                        stem_stride=stem_stride, full_res_channels=full_res).eval()
    x = torch.randn(1, 3, 21, 30)
    with torch.no_grad():
        y, feats = net(x, return_features=True)
    assert y.shape == (1, 2, 21, 30)
    assert ("enc0" in feats) == (stem_stride == 1 or full_res > 0)
    assert ("dec0" in feats) == (stem_stride == 1 or full_res > 0)


def test_student_trains_with_gradients_everywhere():
    net = _small("student_mobile", 2).train()
    x = torch.randn(2, 1, 24, 20)
    y, feats = net(x, return_features=True)
    (y.square().mean() + sum(f.mean() for f in feats.values())).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name


def test_teacher_and_student_features_pair_for_every_task():
    for task in TASKS:
        (ta, targs), (sa, sargs) = default_arch_args(task, "teacher"), default_arch_args(task, "student")
        teacher, student = build_network(ta, **targs), build_network(sa, **sargs)
        common = [n for n in student.feature_channels if n in teacher.feature_channels]
        assert "bottleneck" in common and "enc1" in common and "dec1" in common, task
        for n in common:
            assert student.feature_strides[n] == teacher.feature_strides[n], (task, n)


@pytest.mark.parametrize("task", TASKS)
def test_default_configs(task, tmp_path):
    from KDSegmentationLib.models.files import load_model, save_model
    from KDSegmentationLib.tasks import get_task

    spec = get_task(task)
    nets = {}
    for role in ("teacher", "student"):
        arch, args = default_arch_args(task, role)
        assert json.loads(json.dumps(args)) == args  # stored in the model file header
        assert args["spatial_dims"] == spec.spatial_dims and args["out_channels"] == spec.num_classes
        assert args["in_channels"] == spec.input_channels
        nets[role] = build_network(arch, **args)
    n_teacher, n_student = count_parameters(nets["teacher"]), count_parameters(nets["student"])
    assert n_student * 20 <= n_teacher, (task, n_student, n_teacher)
    assert n_teacher <= 15_000_000  # <= 30 MB in fp16
    if task == "retina":
        assert n_student <= 100_000

    # the model file rebuilds the student from its header and gives the same output
    arch, args = default_arch_args(task, "student")
    student = nets["student"].eval()
    path = save_model(tmp_path / "s.kdseg.pt", student, arch=arch, arch_args=args, task=task, role="student",
                      half=False)
    loaded = load_model(path).network
    x = torch.rand(1, args["in_channels"], *([13] * spec.spatial_dims))
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-5)


def test_default_arch_args_returns_copies():
    _, a = default_arch_args("retina", "teacher")
    a["filters"].append(1)
    assert default_arch_args("retina", "teacher")[1]["filters"] != a["filters"]
    with pytest.raises(ValueError):
        default_arch_args("retina", "assistant")


def test_teacher_state_dict_has_no_duplicate_weights():
    net = _small("teacher_unet", 2)
    n_state = sum(v.numel() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k)
    assert n_state == count_parameters(net)


def test_folded_batchnorm_matches_conv_then_norm():
    torch.manual_seed(0)
    for dims in (2, 3):
        block = ConvNormAct(dims, 3, 5, 3, stride=2, norm="batch")
        bn = block.norm
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
        block.eval()
        x = torch.randn(2, 3, *([9] * dims))
        with torch.no_grad():
            expected = torch.clamp(bn(block.conv(x)), 0, 6)
            assert torch.allclose(block(x), expected, atol=1e-5)


def test_importing_networks_and_building_a_student_does_not_import_monai(repo_root):
    # student inference must start fast: importing MONAI costs seconds
    code = ("import sys; sys.path.insert(0, 'KDSegmentation');"
            "from KDSegmentationLib.models.networks import build_network, default_arch_args;"
            "build_network(*default_arch_args('retina', 'student')[:1], **default_arch_args('retina', 'student')[1]);"
            "assert 'monai' not in sys.modules, 'monai imported'")
    subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True)
