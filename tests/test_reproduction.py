"""benchmarks/sweep.py: which runs a table file asks for, which it skips (their summary.json is
there), and the Markdown it tabulates from hand-made run folders; every table file names
configs that exist; a short USPS -> MNIST sweep through the real CLI (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benchmarks import sweep
from dam_lightning.data import LabelShift

from .conftest import REPO, SHARED_DIGITS

SPEC = {
    "title": "digits",
    "seeds": [0, 1],
    "configs": ["configs/usps_mnist.yaml"],
    "source": ["configs/usps_mnist_source.yaml"],
    "tables": [
        {
            "title": "Table 1",
            "columns": {
                "ours": [],
                "augmented": {"source": ["configs/experiments/source_shrink.yaml"]},
                "paper": {"text": {"ADDA": "97.2 ± 0.4"}},
            },
            "rows": {
                "source only": {"stage": "source only"},
                "ADDA": ["configs/ablations/adda.yaml"],
                "GAM (full)": {"seeds": [0]},
            },
        }
    ],
}


def _cell(column: str, row: str) -> dict:
    table = SPEC["tables"][0]
    return sweep.merge(SPEC, table, table["columns"][column], table["rows"][row])


def _finish(run: sweep.Run, runs, rows: dict | None = None) -> None:
    """A hand-made finished run: its folder with summary.json (stage 1: its checkpoint)."""
    folder = runs / run.name / "2026-01-01_00-00-00"
    if run.stage1:
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "source.ckpt").write_bytes(b"")
    else:
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(rows))


def test_a_cell_runs_the_file_column_and_row_configs_once_per_seed_after_its_source_run():
    runs = sweep.cell_runs(SPEC, _cell("augmented", "ADDA"))
    assert [r.seed for r in runs] == [0, 1]
    assert runs[0].configs == ("configs/usps_mnist.yaml", "configs/ablations/adda.yaml")
    assert runs[0].source.configs == (
        "configs/usps_mnist_source.yaml",
        "configs/experiments/source_shrink.yaml",
    )
    command = runs[1].command(REPO / "runs")
    assert command[3:8] == ["fit", "--config", "configs/usps_mnist.yaml", "--config",
                            "configs/ablations/adda.yaml"]  # fmt: skip
    assert "--seed_everything=1" in command and "--data.seed=1" in command
    assert any(a.startswith("--model.init_args.source_weights=") for a in command)
    # The same configs adapted from another source network are another run.
    plain = sweep.cell_runs(SPEC, _cell("ours", "ADDA"))[0]
    assert plain.name != runs[0].name and plain.configs == runs[0].configs
    assert sweep.cell_runs(SPEC, _cell("ours", "GAM (full)"))[0].seed == 0  # a row's own seeds
    assert sweep.cell_runs(SPEC, _cell("paper", "ADDA")) == []  # fixed text: nothing to run


def test_the_sweep_runs_sources_first_each_run_once_and_skips_runs_with_results(
    tmp_path, monkeypatch
):
    done = []
    monkeypatch.setattr(sweep, "execute", lambda run, root: done.append(run) or 0)
    finished = sweep.cell_runs(SPEC, _cell("ours", "ADDA"))[0]
    _finish(finished.source, tmp_path)
    _finish(finished, tmp_path, {"after GAM": {"acc": 0.9}})
    sweep.run_all(SPEC, tmp_path, jobs=1)
    sources = [r for r in done if r.stage1]
    assert done[: len(sources)] == sources  # every stage-1 run before any adaptation
    assert len(sources) == 3  # plain seed 1, shrink seeds 0 and 1 (plain seed 0 exists)
    adaptations = done[len(sources) :]
    assert finished not in adaptations
    # source only and GAM (full) share a run; ADDA; per column: 2 + 2 (ours: 1 done) + 2 + 2
    assert len(adaptations) == len(set(adaptations)) == 7


def test_a_fine_tune_starts_from_its_init_run_after_that_run_and_its_stage_1_run(
    tmp_path, monkeypatch
):
    spec = {"seeds": [3], "tables": [{"columns": {"N=5": {"args": ["--data.few_shot=5"]}}, "rows": {
        "from GAM": {"configs": ["configs/few_shot.yaml"],
                     "init": {"configs": ["configs/usps_mnist.yaml"], "source": ["s.yaml"]}},
        "from the source network": {"configs": ["configs/few_shot.yaml"],
                                    "init": {"source": ["s.yaml"]}}}}]}  # fmt: skip
    table = spec["tables"][0]
    cell = sweep.merge(spec, table, table["columns"]["N=5"], table["rows"]["from GAM"])
    (tune,) = sweep.cell_runs(spec, cell)
    gam, stage1 = tune.source, tune.source.source
    assert tune.fine_tune and not gam.fine_tune and stage1.stage1 and stage1.configs == ("s.yaml",)
    command = tune.command(tmp_path)
    gam_folder = tmp_path / gam.name / "<date>_<time>"
    assert f"--model.init_args.init_weights={gam_folder}/checkpoints/last.ckpt" in command
    assert not any("source_weights" in a for a in command)
    assert any(a.endswith("/checkpoints/source.ckpt") for a in gam.command(tmp_path))
    row = table["rows"]["from the source network"]
    cell = sweep.merge(spec, table, table["columns"]["N=5"], row)
    (from_source,) = sweep.cell_runs(spec, cell)
    assert from_source.source == stage1  # one stage-1 run for both rows
    assert any(a.startswith("--model.init_args.init_weights=") and a.endswith("source.ckpt")
               for a in from_source.command(tmp_path))  # fmt: skip
    done = []
    monkeypatch.setattr(sweep, "execute", lambda run, root: done.append(run) or 0)
    sweep.run_all(spec, tmp_path, jobs=1)
    assert done[0] == stage1 and done[1] in (gam, from_source) and done[-1] == tune
    assert len(done) == len(set(done)) == 4


def test_the_report_holds_means_over_seeds_the_stage_row_and_partial_cells(tmp_path):
    for seed, acc in ((0, 0.90), (1, 0.92)):
        run = sweep.cell_runs(SPEC, _cell("ours", "ADDA"))[seed]
        rows = {"source only": {"acc": 0.7 + seed / 100}, "after ADDA": {"acc": acc}}
        _finish(run, tmp_path, rows)
    gam = sweep.cell_runs(SPEC, _cell("ours", "source only"))[0]
    _finish(gam, tmp_path, {"source only": {"acc": 0.7}, "after GAM": {"acc": 0.95}})
    SPEC["tables"][0]["per_seed"] = True
    try:
        text = sweep.tabulate(SPEC, tmp_path, "benchmarks/tables/digits.yaml")
    finally:
        del SPEC["tables"][0]["per_seed"]
    assert "    python -m benchmarks.sweep benchmarks/tables/digits.yaml" in text
    assert "| | ours | augmented | paper |" in text
    assert "| ADDA | 91.0 ± 1.4 | - | 97.2 ± 0.4 |" in text  # the last summary row by default
    assert "| source only | 70.0 (n=1) | - | - |" in text  # the stage row, one of two seeds
    assert "| GAM (full) | 95.0 | - | - |" in text  # the row's only seed: complete
    assert "| ADDA | ours | 0: 90.0, 1: 92.0 |" in text
    assert "- row ADDA: `--config configs/ablations/adda.yaml`" in text


def test_every_table_file_names_configs_that_exist_and_a_report_in_docs_results():
    for path in sorted((REPO / "benchmarks" / "tables").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        assert spec["report"].startswith("docs/results/"), path.name
        for cell in sweep.cells(spec):
            for run in sweep.cell_runs(spec, cell):
                for config in run.configs + (run.source.configs if run.source else ()):
                    assert (REPO / config).is_file(), f"{path.name}: {config}"


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


@pytest.mark.slow
def test_gam_beats_source_only_on_usps_to_mnist(tmp_path):
    """A few hundred iterations of USPS -> MNIST on the real test files, through the CLI."""
    if not SHARED_DIGITS.is_dir():
        pytest.skip(f"real digits not available: {SHARED_DIGITS} does not exist")
    (tmp_path / "source.yaml").write_text("trainer: {max_steps: 300, check_val_every_n_epoch: 99}")
    (tmp_path / "adapt.yaml").write_text("trainer: {max_steps: 600, check_val_every_n_epoch: 99}")
    reduced = "configs/digits_reduced.yaml"
    column = {
        "configs": ["configs/usps_mnist.yaml", reduced, str(tmp_path / "adapt.yaml")],
        "source": ["configs/usps_mnist_source.yaml", reduced, str(tmp_path / "source.yaml")],
    }
    table = {"title": "t", "rows": {"GAM": []}, "columns": {"USPS->MNIST": column}}
    spec = {"title": "t", "seeds": [0], "tables": [table]}
    sweep.run_all(spec, tmp_path / "runs", jobs=1)
    [run] = [r for cell in sweep.cells(spec) for r in sweep.cell_runs(spec, cell)]
    source_only = sweep.value(run, tmp_path / "runs", "source only", "acc")
    gam = sweep.value(run, tmp_path / "runs", None, "acc")
    assert 40 < source_only < 75  # measured 59.1 (previous script)
    assert gam > source_only + 10  # measured 85.6 (previous script)
