"""The diagnosis engine: gaps checked against statistics computed here with plain hooks and
``torch.std_mean``; the domain classifier at chance on identical data and near 1 on grossly
different data; gaps gone after Gaussian matching; the outputs (the gaps, and no layer
recommendation); LeNet (vector and map layers) and a tiny ERFNet."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dam_lightning.data import DomainAdaptationDataModule, SynDigits
from dam_lightning.diagnosis import (
    FILES,
    diagnose,
    diagnose_datamodule,
    discriminability,
)
from dam_lightning.diagnosis.discriminability import holdout_split
from dam_lightning.matching import foldable_layers, gaussian_match
from dam_lightning.models import ERFNet, LeNet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def digit_batches(seed: int, count: int = 3, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 28, 28, generator=g) for _ in range(count)]


def shifted(batches, scale=0.5, offset=0.3, power=2.0) -> list[torch.Tensor]:
    """Another domain: a non-linear change of contrast (squared), so that matching the first
    layer's statistics does not match every later one by itself."""
    return [scale * x.pow(power) + offset for x in batches]


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet()


@pytest.fixture(scope="module")
def lenet_diagnosis(lenet):
    source = digit_batches(0)
    return diagnose(lenet, source, shifted(source), progress=False), source


def direct_statistics(net, batches, name):
    """Per-channel mean and population std of layer ``name``'s output, from one concatenated
    tensor (hooks and ``torch.std_mean``, nothing of the library)."""
    outputs = []
    module = dict(net.named_modules())[name]
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    with torch.no_grad():
        for x in batches:
            net(x)
    handle.remove()
    values = torch.cat(outputs).double().transpose(0, 1).flatten(1)
    std, mean = torch.std_mean(values, dim=1, correction=0)
    return mean, std


def test_discriminability_is_chance_on_identical_data_and_near_one_on_different_data():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(300, 16, generator=g)
    same = discriminability(source, source.clone())
    assert same.accuracy == pytest.approx(0.5, abs=1e-9)
    assert same.a_distance == pytest.approx(0.0, abs=1e-9)
    # Two independent draws of one distribution: chance up to sampling noise.
    other_draw = discriminability(source, torch.randn(300, 16, generator=g))
    assert abs(other_draw.accuracy - 0.5) < 0.1
    different = discriminability(source, 3 * torch.randn(300, 16, generator=g) + 4)
    assert different.accuracy > 0.98
    assert different.a_distance == pytest.approx(2 * (1 - 2 * (1 - different.accuracy)))


def test_identical_domains_have_no_gap_and_chance_discriminability(lenet):
    source = digit_batches(1)
    diagnosis = diagnose(lenet, source, [x.clone() for x in source], progress=False)
    for row in diagnosis.layers:
        assert row.mean_gap_before == pytest.approx(0, abs=1e-6)
        assert row.std_gap_before == pytest.approx(0, abs=1e-5)
        assert row.accuracy_before == pytest.approx(0.5, abs=1e-9)
        assert row.a_distance_after == pytest.approx(0.0, abs=0.1)


def test_grossly_different_domains_are_told_apart_at_every_layer(lenet_diagnosis):
    diagnosis, _ = lenet_diagnosis
    for row in diagnosis.layers:
        assert row.accuracy_before > 0.95, row
        assert row.a_distance_before > 1.8, row


def test_gaps_equal_statistics_computed_directly(lenet, lenet_diagnosis):
    diagnosis, source = lenet_diagnosis
    target = shifted(source)
    for row in diagnosis.layers:
        mu_s, sigma_s = direct_statistics(lenet, source, row.name)
        mu_t, sigma_t = direct_statistics(lenet, target, row.name)
        pooled = ((sigma_s**2 + sigma_t**2) / 2).sqrt()
        mean_gap = ((mu_t - mu_s).abs() / (pooled + 1e-8)).mean().item()
        std_gap = ((sigma_t + 1e-8) / (sigma_s + 1e-8)).log().abs().mean().item()
        assert row.mean_gap_before == pytest.approx(mean_gap, rel=1e-4, abs=1e-6)
        assert row.std_gap_before == pytest.approx(std_gap, rel=1e-4, abs=1e-6)
        assert row.channels == len(mu_s)


def test_gaps_vanish_after_gaussian_matching_at_the_matched_layers(lenet_diagnosis):
    diagnosis, _ = lenet_diagnosis
    assert diagnosis.settings["matched_layers"] == ["conv1.0", "conv2.0", "fc3.1", "fc4"]
    for row in diagnosis.layers:
        # Matched on the training half: 0 there, sampling noise on the held-out half.
        assert row.matched
        assert row.mean_gap_after < 0.05 < row.mean_gap_before
        assert row.std_gap_after < 0.05 < row.std_gap_before


def test_after_matching_is_gaussian_matching_fitted_to_the_training_part(lenet, lenet_diagnosis):
    """The "after" gaps, reproduced here: a copy of F_s matched with the training part of each
    domain (``holdout_split``), its statistics on all target images by plain hooks."""
    diagnosis, source = lenet_diagnosis
    target = shifted(source)
    train, _ = holdout_split(sum(len(x) for x in source), 0.5, seed=0)

    def training_part(batches):
        return [torch.cat(batches)[train]]

    target_net = copy.deepcopy(lenet)
    gaussian_match(lenet, target_net, training_part(source), training_part(target))
    for row in diagnosis.layers:
        mu_s, sigma_s = direct_statistics(lenet, source, row.name)
        mu_t, sigma_t = direct_statistics(target_net, target, row.name)
        pooled = ((sigma_s**2 + sigma_t**2) / 2).sqrt()
        mean_gap = ((mu_t - mu_s).abs() / (pooled + 1e-8)).mean().item()
        assert row.mean_gap_after == pytest.approx(mean_gap, rel=1e-3, abs=1e-6)


def test_lenet_vector_and_map_layers_in_depth_order(lenet_diagnosis):
    diagnosis, source = lenet_diagnosis
    rows = diagnosis.layers
    assert [(r.depth, r.name, r.kind, r.channels) for r in rows] == [
        (1, "conv1.0", "Conv2d", 20),
        (2, "conv2.0", "Conv2d", 50),
        (3, "fc3.1", "Linear", 500),
        (4, "fc4", "Linear", 10),
    ]
    assert diagnosis.output_layer == "fc4"
    assert diagnosis.settings["source_images"] == sum(len(x) for x in source)


def test_named_layers_after_a_relu_are_diagnosed_but_not_matched(lenet):
    source = digit_batches(2)
    diagnosis = diagnose(lenet, source, shifted(source), layers=["fc3", "fc4"], progress=False)
    fc3 = diagnosis.layer("fc3")
    assert (fc3.kind, fc3.channels, fc3.matched) == ("Sequential", 500, False)
    assert diagnosis.layer("fc4").matched and diagnosis.output_layer == "fc4"


def test_the_network_output_is_added_when_no_foldable_layer_produces_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    source = [torch.randn(20, 6, generator=g) for _ in range(2)]
    diagnosis = diagnose(net, source, [x + 1 for x in source], progress=False)
    assert [row.name for row in diagnosis.layers] == ["0", "output"]
    assert diagnosis.output_layer == "output"


def test_the_source_network_is_left_as_it_was(lenet):
    lenet.train()
    lenet.fc4.eval()
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    source = digit_batches(3, count=2)
    diagnose(lenet, source, shifted(source), progress=False)
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    assert lenet.training and lenet.conv1.training and not lenet.fc4.training
    lenet.eval()


def test_histograms_keep_a_bounded_sample_of_the_largest_gap_channels(lenet):
    source = digit_batches(4)
    diagnosis = diagnose(
        lenet,
        source,
        shifted(source),
        histogram_layers=["conv1.0", "fc4"],
        histogram_channels=2,
        histogram_values=500,
        progress=False,
    )
    assert [(h.layer, len(h.source)) for h in diagnosis.histograms] == [
        ("conv1.0", 500),
        ("conv1.0", 500),
        ("fc4", 96),  # a vector layer has one value per image: all 96 images fit
        ("fc4", 96),
    ]
    conv1 = [h for h in diagnosis.histograms if h.layer == "conv1.0"]
    assert conv1[0].gap >= conv1[1].gap
    # Target and matched target are sampled at the same positions: matching is affine per
    # channel at conv1.0 (nothing corrected before it), so the samples are too.
    first = conv1[0]
    slope = (first.matched - first.matched.mean()).norm() / (
        first.target - first.target.mean()
    ).norm()
    restored = first.target.mean() + (first.matched - first.matched.mean()) / slope
    assert torch.allclose(restored, first.target, atol=1e-4)


def test_histogram_layers_spread_over_depth(lenet_diagnosis):
    diagnosis, _ = lenet_diagnosis
    layers = list(dict.fromkeys(h.layer for h in diagnosis.histograms))
    assert layers == ["conv1.0", "conv2.0", "fc3.1", "fc4"]  # 4 of 4
    assert len(diagnosis.histograms) == 4 * 3


def test_outputs_are_written(lenet_diagnosis, tmp_path):
    diagnosis, _ = lenet_diagnosis
    paths = diagnosis.save(tmp_path / "diagnose")
    assert list(paths) == list(FILES)
    markdown = (tmp_path / "diagnose" / "diagnose.md").read_text()
    for row in diagnosis.layers:
        assert f"| {row.depth} | " in markdown and row.name in markdown
    assert "layers:" not in markdown and "recommend" not in markdown.lower()
    data = json.loads((tmp_path / "diagnose" / "diagnose.json").read_text())
    assert [row["name"] for row in data["layers"]] == [r.name for r in diagnosis.layers]
    assert not [key for key in data if "recommend" in key]
    assert "bands" not in data["settings"] and "min_a_distance" not in data["settings"]
    assert data["layers"][0]["a_distance_after"] == diagnosis.layers[0].a_distance_after
    for picture in ("gap_by_layer.png", "histograms.png"):
        assert (tmp_path / "diagnose" / picture).read_bytes().startswith(PNG_SIGNATURE)
    assert not [p for p in (tmp_path / "diagnose").iterdir() if p.name.startswith(".tmp")]


def _fake_diagnosis(names: list[str]):
    from types import SimpleNamespace

    rows = [
        SimpleNamespace(name=name, depth=depth, mean_gap_before=1.0, mean_gap_after=0.1,
                        std_gap_before=0.5, std_gap_after=0.1, a_distance_before=1.5,
                        a_distance_after=1.0)  # fmt: skip
        for depth, name in enumerate(names)
    ]
    return SimpleNamespace(layers=rows, settings={"network": "net"})


def test_gap_by_layer_names_every_layer_of_a_small_network_on_its_x_axis(lenet_diagnosis):
    from dam_lightning.diagnosis.figures import plot_gap_by_layer

    diagnosis, _ = lenet_diagnosis
    axes = plot_gap_by_layer(diagnosis).axes[-1]
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert ticks == [row.name for row in diagnosis.layers]
    assert list(axes.get_xticks()) == [row.depth for row in diagnosis.layers]


def test_gap_by_layer_names_one_layer_in_k_of_erfnet():
    from dam_lightning.diagnosis.figures import NAMED_TICKS, plot_gap_by_layer

    names = foldable_layers(ERFNet(19, width=0.25))
    assert len(names) == 113
    figure = plot_gap_by_layer(_fake_diagnosis(names))
    axes = figure.axes[-1]
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert len(ticks) <= NAMED_TICKS and ticks == names[::3]  # in network order
    assert all(not ax.collections for ax in figure.axes)  # no markers on any layer
    assert all(label.get_rotation() == 90 for label in axes.get_xticklabels())  # upright
    assert "one in 3 named" in axes.get_xlabel()


def test_report_prints_the_gaps_of_every_layer_and_no_layer_recommendation(lenet_diagnosis):
    from dam_lightning.diagnosis.result import PURPOSE

    diagnosis, _ = lenet_diagnosis
    report = diagnosis.report()
    assert report.count("\n| ") == len(diagnosis.layers)  # the rows below the header
    lines = report.splitlines()
    for row in diagnosis.layers:
        [line] = [x for x in lines if x.startswith(f"| {row.depth} | {row.name} | ")]  # not bold
        assert line.endswith(
            f"| {row.mean_gap_before:.3f} | {row.std_gap_before:.3f} "
            f"| {row.accuracy_before:.3f} | {row.a_distance_before:.3f} "
            f"| {row.mean_gap_after:.3f} | {row.std_gap_after:.3f} "
            f"| {row.accuracy_after:.3f} | {row.a_distance_after:.3f} |"
        )
    assert report.rstrip().endswith(PURPOSE) and "do not pick" in PURPOSE
    assert "layers:" not in report and "recommend" not in report.lower()
    assert not hasattr(diagnosis, "recommendation")


def test_tiny_erfnet(tmp_path):
    torch.manual_seed(0)
    net = ERFNet(3, width=0.25, dropout=0, example_input_shape=(3, 32, 64))
    g = torch.Generator().manual_seed(0)
    source = [torch.randn(4, 3, 32, 64, generator=g) for _ in range(4)]
    target = [1.5 * x.abs() - 0.5 for x in source]
    diagnosis = diagnose(net, source, target, histogram_layers=3, progress=False)
    names = [row.name for row in diagnosis.layers]
    assert names == foldable_layers(net)  # registration order is execution order in ERFNet
    assert diagnosis.output_layer == "decoder.output_conv" == names[-1]
    assert diagnosis.layer("encoder.initial_block.bn").channels == 4
    assert diagnosis.layer("decoder.output_conv").kind == "ConvTranspose2d"
    for row in diagnosis.layers:
        assert row.mean_gap_after < 0.05, row.name
    assert diagnosis.layer("encoder.initial_block.bn").a_distance_before > 1.5
    layers = list(dict.fromkeys(h.layer for h in diagnosis.histograms))
    assert layers == [names[0], names[len(names) // 2], names[-1]]
    diagnosis.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


def test_diagnose_datamodule_uses_the_calibration_batches():
    torch.manual_seed(0)
    data = DomainAdaptationDataModule(SynDigits(60, seed=0), SynDigits(60, seed=1), batch_size=10)
    diagnosis = diagnose_datamodule(LeNet(), data, calibration_batches=3, progress=False)
    assert diagnosis.settings["source_images"] == diagnosis.settings["target_images"] == 30
    assert diagnosis.settings["calibration_batches"] == 3


def test_progress_bar_is_silent_when_asked(lenet, capsys):
    source = digit_batches(5, count=1)
    diagnose(lenet, source, shifted(source), progress=False)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


class WithSpareHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.spare = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


def test_a_layer_that_does_not_run_is_refused():
    batches = [torch.randn(8, 4)]
    with pytest.raises(ValueError, match=r"layers \['spare'\] of WithSpareHead did not run"):
        diagnose(WithSpareHead(), batches, batches, progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": ["nope"]}, "has no layer named 'nope'"),
        ({"histogram_layers": ["fc4"], "layers": ["fc3.1"]}, "not among the diagnosed layers"),
        ({"holdout": 1.5}, "holdout must be a fraction"),
        ({"histogram_values": 0}, "histogram_values must be an integer >= 1, got 0"),
        ({"holdout": 0.01}, "8 calibration images cannot be split"),
    ],
)
def test_errors_name_the_value_and_the_fix(lenet, options, message):
    source = digit_batches(6, count=1, size=8)
    with pytest.raises((ValueError, TypeError), match=message):
        diagnose(lenet, source, source, progress=False, **options)


def test_a_linear_probe_is_blind_after_matching_and_the_kernel_probe_is_not(lenet):
    """Why the default probe is a kernel one: matched on its training images, a layer's pooled
    features have the source's means there, so a linear classifier is at chance by construction
    (exactly, not below it: the held-out images took no part in the matching)."""
    source = digit_batches(7, count=4)
    # Same pixel mean and variance, but the target's images are each brighter or darker: the
    # spread of its pooled features differs, their mean does not.
    g = torch.Generator().manual_seed(7)
    brightness = [0.5 * torch.randint(0, 2, (len(x), 1, 1, 1), generator=g) - 0.25 for x in source]
    target = [0.25 + 0.5 * x + b for x, b in zip(source, brightness, strict=True)]
    linear = diagnose(lenet, source, target, probe="linear", progress=False)
    kernel = diagnose(lenet, source, target, progress=False)
    for row in linear.layers:
        assert row.accuracy_after == pytest.approx(0.5, abs=1e-9), row.name
    for row in kernel.layers[:3]:
        assert row.a_distance_after > 1.5, row.name
    assert kernel.settings["probe"] == "kernel" and linear.settings["probe"] == "linear"


def test_diagnose_analyses_the_source_network_of_a_gam_checkpoint(tmp_path):
    """A GAM run that trained F_s itself (source_steps, as the segmentation demo) leaves F_s
    only in its checkpoint, beside the adapted F_t: diagnose must read F_s, not F_t."""
    from dam_lightning.modules import GAMAdaptModule
    from dam_lightning.trainer import DamTrainer

    torch.manual_seed(0)
    adapted = GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
    with torch.no_grad():
        for p in adapted.target_net.parameters():
            p.add_(1.0)  # F_t != F_s
    path = tmp_path / "gam.ckpt"
    torch.save({"state_dict": adapted.state_dict()}, path)
    fresh = GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
    data = DomainAdaptationDataModule(SynDigits(64, seed=0), SynDigits(64, seed=1), batch_size=16)
    trainer = DamTrainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    trainer.diagnose(fresh, data, ckpt_path=str(path), calibration_batches=2)
    for name, value in fresh.source_net.state_dict().items():
        assert torch.equal(value, adapted.source_net.state_dict()[name]), name
