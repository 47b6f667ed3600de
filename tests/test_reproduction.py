"""A small, fast version of benchmarks/reproduce_digits.py on the real USPS/MNIST test files:
a few hundred iterations of USPS -> MNIST, one seed. Skipped when ../shared has no digits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dam_lightning.data import LabelShift

from .conftest import REPO, SHARED_DIGITS


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "reproduce_digits", REPO / "benchmarks" / "reproduce_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gam_beats_source_only_on_usps_to_mnist(tmp_path):
    if not SHARED_DIGITS.is_dir():
        pytest.skip(f"real digits not available: {SHARED_DIGITS} does not exist")
    bench = _benchmark()
    assert bench.detect_protocol(str(SHARED_DIGITS)) == "reduced"
    source, target = bench.load_domains("USPS->MNIST", str(SHARED_DIGITS), "reduced")
    weights = tmp_path / "source.pt"
    source_only = bench.train_supervised(source, target, 0, 300, weights)
    gam = bench.adapt(bench.ADAPTATION_ROWS["GAM (full)"], source, target, 0, 300, weights)
    assert 40 < source_only < 75  # measured 59.1
    assert gam > source_only + 10  # measured 80.6


def test_label_shift_removes_half_of_the_odd_digits_deterministically():
    labels = torch.arange(200) % 10
    base = torch.utils.data.TensorDataset(torch.zeros(200, 1), labels)
    shifted = LabelShift(base, drop="odd", fraction=0.5, seed=3)
    kept = torch.tensor([int(shifted[i][1]) for i in range(len(shifted))])
    counts = torch.bincount(kept, minlength=10).tolist()
    assert counts == [20, 10, 20, 10, 20, 10, 20, 10, 20, 10]
    assert LabelShift(base, drop="odd", fraction=0.5, seed=3).indices == shifted.indices
    assert LabelShift(base, drop="odd", fraction=0.5, seed=4).indices != shifted.indices
    with pytest.raises(ValueError, match="drop must be 'odd' or 'even'"):
        LabelShift(base, drop="prime")
