"""Run folders and the two-stage workflow through the real CLI: one folder per command, named by
experiment and time; stage 1 leaves its network under a stable name that stage 2 reads and
reports; evaluation commands write into their own folder; a failed run leaves nothing behind;
the last lines on screen say where everything went (after W&B's goodbye, with its id kept in the
run folder, and the source training's progress bar: tests/test_cli_ddp.py, in a real terminal
session)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from dam_lightning.cli import main
from dam_lightning.weights import checkpoint_origin, read_weights_file

from .conftest import REPO

STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?"
OFFLINE_DIGITS = [
    "--data.source=dam_lightning.data.SynDigits", "--data.source.num_samples=128",
    "--data.target=dam_lightning.data.SynDigits", "--data.target.num_samples=96",
    "--data.target.seed=1", "--data.source_val=null",
    "--data.batch_size=32", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]  # fmt: skip


def _digits(command: str, config: str, *extra: str) -> list[str]:
    return [command, "--config", str(REPO / "configs" / config), *OFFLINE_DIGITS, *extra]


def _last_lines(out: str, start: str) -> list[str]:
    lines = out.strip().splitlines()
    index = max(i for i, line in enumerate(lines) if line.startswith(start))
    return lines[index:]


@pytest.mark.slow
def test_stage_one_twice_then_stage_two_validate_and_predict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' runs/... paths land here
    published = tmp_path / "runs" / "mnist_usps_source" / "source.ckpt"
    stage_one = []
    for _ in range(2):
        main(_digits("fit", "mnist_usps_source.yaml", "--trainer.max_steps=2"))
        out = capsys.readouterr().out
        tail = _last_lines(out, "Run folder: ")
        assert re.fullmatch(f"Run folder: runs/mnist_usps_source/{STAMP}", tail[0]), tail
        assert tail[-1] == "Network for the next stage: runs/mnist_usps_source/source.ckpt"
        folder = tail[0].removeprefix("Run folder: ")
        assert (tmp_path / folder / "checkpoints" / "source.ckpt").is_file()  # in its own folder
        assert (tmp_path / folder / "config.yaml").is_file()
        stage_one.append(folder)
        assert checkpoint_origin(read_weights_file(published, "source_weights")) == folder
    assert stage_one[0] != stage_one[1]
    assert published.stat().st_mode & 0o044  # readable like any other file

    main(_digits("fit", "mnist_usps.yaml", "--trainer.max_steps=4"))
    tail = _last_lines(capsys.readouterr().out, "Run folder: ")
    stage_two = Path(tail[0].removeprefix("Run folder: "))
    log = (stage_two / "log.txt").read_text()  # what Lightning's logger also prints on screen
    assert "Source network F_s: runs/mnist_usps_source/source.ckpt (written " in log
    assert f"by the run in {stage_one[1]})" in log  # the second stage-1 run, not the first
    assert re.fullmatch(f"runs/mnist_usps/{STAMP}", str(stage_two))
    last = stage_two / "checkpoints" / "last.ckpt"
    assert f"  checkpoint:  {last}" in tail[1] and (tmp_path / last).is_file()
    assert any(line.startswith("  summary:") for line in tail)

    main(_digits("validate", "mnist_usps.yaml", f"--ckpt_path={last}"))
    tail = _last_lines(capsys.readouterr().out, "Run folder: ")
    folder = Path(tail[0].removeprefix("Run folder: "))
    assert folder.parent == stage_two and re.fullmatch(f"validate-{STAMP}", folder.name)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["val/target/acc"] <= 1.0
    assert not (folder / "checkpoints").exists()

    main(_digits("predict", "mnist_usps.yaml", f"--ckpt_path={last}"))
    tail = _last_lines(capsys.readouterr().out, "Run folder: ")
    folder = Path(tail[0].removeprefix("Run folder: "))
    assert folder.parent == stage_two and folder.name.startswith("predict-")
    assert f"  predictions: {folder / 'predictions'}" in tail
    with open(folder / "predictions" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96 and set(rows[0]) == {"index", "prediction", "confidence", "label"}


def test_a_run_that_fails_after_wandb_started_leaves_no_folder_and_no_offline_run(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(_digits("fit", "mnist_usps.yaml", "--model.init_args.source_weights=missing.ckpt"))
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith("error: source_weights: missing.ckpt")
    assert "wandb sync" not in captured.out + captured.err  # no offer to upload a deleted run
    assert [p for p in tmp_path.rglob("*")] == []
