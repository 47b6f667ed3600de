"""docs/figures/make_figures.py --gam-curves: the per-layer curves come from a CSVLogger run's
metrics.csv, in the layers' order in the network, with the target's mIoU beside them."""

from __future__ import annotations

import importlib.util

from .conftest import REPO


def _make_figures():
    path = REPO / "docs" / "figures" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_curves_of_a_run_folder_are_read_per_layer_and_plotted(tmp_path):
    run = tmp_path / "seed10" / "2026-01-01_00-00-00"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "epoch,step,layer/encoder.layers.10/acc_d,layer/encoder.layers.2/mean_gap,val/target/miou\n"
        "0,9,0.75,,\n0,19,,0.25,\n0,49,,,0.125\n"
    )
    figures = _make_figures()
    curves = figures.run_curves(str(run))
    assert curves["encoder.layers.10"]["acc_d"] == [(9, 0.75)]
    assert curves["encoder.layers.2"]["mean_gap"] == [(19, 0.25)]
    assert curves["target"]["mIoU (%)"] == [(49, 12.5)]
    assert sorted(["encoder.layers.10", "encoder.layers.2"], key=figures._natural)[0].endswith(".2")
    figures.gam_curves_figure([str(run)], str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0
