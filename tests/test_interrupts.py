"""Interrupts and run folders through the real entry point, in a subprocess: SIGTERM (what SLURM
sends before a kill) or Ctrl-C (SIGINT) during ``fit`` stops at the end of a batch, saves
``last.ckpt``, says where and prints the command that resumes the run; the folder says it is
unfinished until the resumed run, in the same folder, ends well, with the weights and the table
of the run that was never stopped."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from .conftest import REPO


class SignalAt(L.Callback):
    """Send ``signum`` to this process at the start of the first batch at or after
    ``global_step``, once, and only in a run that did not resume from a checkpoint: the
    resumed run, started with the same command line, must not be stopped again."""

    def __init__(self, signum: int = 15, global_step: int = 4):
        self.signum = signum
        self.global_step = global_step
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        resumed = trainer.ckpt_path is not None
        if not (self.sent or resumed) and trainer.global_step >= self.global_step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _demo_args(tmp_path: Path, signum: int, step: int) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--trainer.accelerator=cpu", "--trainer.max_epochs=3", "--trainer.limit_train_batches=3",
        "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_args.source_steps=4",
        "--data.source.init_args.num_samples=200", "--data.batch_size=32",
        "--trainer.callbacks+=tests.test_interrupts.SignalAt",
        f"--trainer.callbacks.signum={signum}", f"--trainer.callbacks.global_step={step}",
    ]  # fmt: skip


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dam_lightning", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code, said",
    [(signal.SIGTERM, 143, "Stopped by SIGTERM"), (signal.SIGINT, 130, "Stopped by Ctrl-C")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_stopped_fit_saves_last_ckpt_says_how_to_resume_and_resumes_in_its_folder(
    signum, code, said, tmp_path
):
    stopped = _run(_demo_args(tmp_path, int(signum), step=6), cwd=REPO)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    err = stopped.stderr
    assert re.search(f"{said} at global step \\d+: the run has not finished", err), err[-2000:]
    (folder,) = (tmp_path / "demo").iterdir()
    last = folder / "checkpoints" / "last.ckpt"
    assert f"Run folder: {folder} (its unfinished.txt says it has not finished)" in err
    assert f"  checkpoint:  {last} (saved where it stopped)" in err
    assert not list(last.parent.glob(".*partial"))  # written aside, then renamed
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] >= 6
    assert checkpoint["callbacks"]["RunFolder"]["network"] == "dam_lightning.models.LeNet"
    assert not (folder / "summary.md").exists()  # stopped before the end: no summary
    unfinished = (folder / "unfinished.txt").read_text()
    (resume_line,) = [line for line in err.splitlines() if line.startswith("Resume with: ")]
    resume = resume_line.removeprefix("Resume with: ")
    assert resume in unfinished and resume.endswith(f"--ckpt_path {last}")
    assert (folder / "wandb").is_dir() and "Traceback" not in err

    argv = shlex.split(resume)[3:]  # python -m dam_lightning ...
    resumed = _run(argv, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((tmp_path / "demo").iterdir()) == [folder]  # no second folder for one run
    assert "dirpath" not in resumed.stdout + resumed.stderr  # Lightning's "has changed" warning
    assert f"Run folder: {folder}" in resumed.stdout
    assert (folder / "summary.md").is_file() and not (folder / "unfinished.txt").exists()
    assert (folder / "config.yaml").is_file() and (folder / "config-1.yaml").is_file()
    assert f"Resuming from {last}" in (folder / "log.txt").read_text()

    if signum == signal.SIGTERM:  # a finished run's checkpoint starts a new folder, never its own
        again = _run(argv, cwd=REPO)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(list((tmp_path / "demo").iterdir())) == 2
        assert (folder / "summary.md").is_file() and not (folder / "config-2.yaml").exists()


def test_ctrl_c_before_the_run_started_leaves_nothing(tmp_path, capsys, monkeypatch):
    from dam_lightning import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.DamCLI, "instantiate_trainer", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_demo_args(tmp_path, int(signal.SIGINT), step=6))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "Stopped by Ctrl-C before the run started: nothing was saved."
    )
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_stopped_in_stage_one_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    straight = _run(_demo_args(tmp_path / "straight", int(signal.SIGTERM), step=1000), cwd=REPO)
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = _demo_args(tmp_path / "stopped", int(signal.SIGTERM), step=3)  # source training
    assert _run(args, cwd=REPO).returncode == 143
    (last,) = (tmp_path / "stopped").rglob("last.ckpt")
    assert _run([*args, f"--ckpt_path={last}"], cwd=REPO).returncode == 0
    (expected,) = (tmp_path / "straight").rglob("last.ckpt")
    want = torch.load(expected, weights_only=True)
    got = torch.load(last, weights_only=True)
    assert got["global_step"] == want["global_step"]
    state = got["state_dict"]
    assert [k for k, v in want["state_dict"].items() if not torch.equal(v, state[k])] == []
    summaries = [(p.parent.parent / "summary.md").read_text() for p in (expected, last)]
    assert summaries[0] == summaries[1]
