"""The segmentation tables of benchmarks/tables/ on hand-made run folders: rows are GAM's stages
or layer choices, columns metrics; the per-seed lines keep the seeds apart, and the notes say why
the report's recommended-layers row is not regenerated (its rule was removed from diagnose)."""

from __future__ import annotations

import json

import yaml

from benchmarks import sweep

from .conftest import REPO


def _spec(name: str) -> dict:
    return yaml.safe_load((REPO / "benchmarks" / "tables" / f"{name}.yaml").read_text())


def _write(spec: dict, root, row: str, seed: int, miou: float) -> None:
    table = spec["tables"][0]
    cell = sweep.merge(spec, table, next(iter(table["columns"].values())), table["rows"][row])
    [run] = [r for r in sweep.cell_runs(spec, cell) if r.seed == seed]
    folder = root / run.name / "2026-01-01_00-00-00"
    folder.mkdir(parents=True)
    stages = ("source only", "after Gaussian matching", "after GAM")
    rows = {s: {"miou": miou + i / 100, "pixel_acc": 0.9} for i, s in enumerate(stages)}
    (folder / "summary.json").write_text(json.dumps(rows))


def test_the_layer_table_reads_each_stage_per_row_and_seed(tmp_path):
    spec = _spec("recommend_layers_seg_demo")
    assert list(spec["tables"][0]["rows"]) == ["GAM, default layers", "ADDA (output only)"]
    for seed, miou in ((20, 0.30), (21, 0.32)):
        _write(spec, tmp_path, "GAM, default layers", seed, miou)
    _write(spec, tmp_path, "ADDA (output only)", 20, 0.20)
    text = sweep.tabulate(spec, tmp_path, "benchmarks/tables/recommend_layers_seg_demo.yaml")
    assert "| GAM, default layers | 31.0 ± 1.4 | 32.0 ± 1.4 | 33.0 ± 1.4 | 90.0 ± 0.0 |" in text
    assert "| ADDA (output only) | 20.0 (n=1) | 21.0 (n=1) | 22.0 (n=1) | 90.0 (n=1) |" in text
    assert "| ADDA (output only) | after GAM | 20: 22.0, 21: - |" in text
    assert "no longer has" in text and "issue 24" in text  # the rule's removal, in the notes


def test_the_seg_demo_table_has_a_row_per_stage_and_a_column_per_metric(tmp_path):
    spec = _spec("seg_demo")
    for seed in (0, 1, 2):
        _write(spec, tmp_path, "after GAM", seed, 0.40 + seed / 10)
    text = sweep.tabulate(spec, tmp_path, "benchmarks/tables/seg_demo.yaml")
    assert "| | pixel acc | class acc | mIoU | worst-class IoU |" in text
    assert "| after GAM | 90.0 ± 0.0 | - | 52.0 ± 10.0 | - |" in text
    assert "| source only | 90.0 ± 0.0 | - | 50.0 ± 10.0 | - |" in text  # the same runs
    assert "data.target_val.init_args.seed set to the seed" in text


def test_the_gam_sweep_shows_each_seeds_gain_of_gam_over_gaussian_matching(tmp_path):
    spec = _spec("gam_sweep_seg_demo")
    first = next(iter(spec["tables"][0]["rows"]))
    for seed in spec["seeds"]:  # after GAM is 1 point above after Gaussian matching in each
        _write(spec, tmp_path, first, seed, 0.10 + seed / 100)
    text = sweep.tabulate(spec, tmp_path, "benchmarks/tables/gam_sweep_seg_demo.yaml")
    assert f"| {first} | 22.0 ± 1.0 | 23.0 ± 1.0 | 1.0 ± 0.0 |" in text
    assert f"| {first} | GAM - Gaussian | 10: 1.0, 11: 1.0, 12: 1.0 |" in text
    assert "less summary row 'after Gaussian matching'" in text
    command = " ".join(sweep.cell_runs(spec, sweep.merge(spec))[0].command(tmp_path))
    assert "--model.init_args.source_weights=" in command  # adapts a cached stage-1 network
    assert "--model.init_args.gan_loss=lsgan" in command  # the starting recipe, pinned
