"""Every command that README.md and docs/*.md show works in a fresh clone, or says beside it what
it needs first (issue 22). Each command parses (``--print_config`` checks every key; a benchmark's
flags go through its own parser); what it reads that a fresh clone lacks (a dataset folder, a
checkpoint of an earlier run) is made by an earlier command of the same code block or named in
the text around it; and the commands that need nothing run here, on tiny sizes.

A command is a ``python -m dam_lightning ...`` or ``python -m benchmarks.<name> ...`` line of a
code block (also after ``srun``, ``torchrun``, ``.venv/bin/``, ``&&``), or an inline
```python -m ...``` / ```<subcommand> --config ...``` span of the prose. ``...`` in a command elides
arguments (dropped here); ``<date>_<time>``-style placeholders stand for a run's own names.
Left out: docs/results/ (reports; their commands are how they were made) and docs/errors.md,
whose inline commands are the bad inputs its table lists; its SLURM requeue block (issue 22) does
not yet say that configs/gta.yaml needs GTA5, Cityscapes and the stage-1 network.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dam_lightning.cli import DamCLI, main

from .cli_helpers import print_config
from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_INSTRUCTIONS = {"docs/errors.md"}
# LightningCLI's commands and those the CLI adds (diagnose, ...): each parses with --print_config.
# A subcommand outside this list (one the CLI handles itself) must at least answer --help.
SUBCOMMANDS = tuple(DamCLI.subcommands())
RUN_HERE = ("fit", "validate", "test", "predict")  # the subcommands run on tiny sizes
ABSENT_IN_A_FRESH_CLONE = ("runs", "data")  # ignored by git: written by runs, or the user's data
WEIGHT_KEYS = ("source_weights", "init_weights", "weights", "backbone_weights")

# Tiny sizes for the configs whose commands run here (keyed by the first --config).
TINY = {
    "configs/demo.yaml": [
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
        "--model.init_args.source_steps=3", "--data.source.init_args.num_samples=96",
        "--data.batch_size=32", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ],
}  # fmt: skip
TRAINING_ONLY = ("--trainer.max_epochs", "--trainer.limit_train_batches", "--trainer.max_steps",
                 "--model.init_args.source_steps")  # fmt: skip

# Commands that need nothing, run (at tiny sizes) by the test named: several processes, or the
# very command with the same sizes. Benchmarks are only parsed: taking minutes is their point.
RUN_ELSEWHERE = {
    "fit --config configs/seg_demo.yaml": "tests/test_seg_demo.py::"
    "test_the_segmentation_demo_runs_all_stages_and_writes_the_overlays",
    "fit --config configs/demo.yaml --trainer.devices 2": "tests/test_cli_ddp.py::"
    "test_two_cpu_processes_run_gam_to_the_end_and_a_resume_matches_the_uninterrupted_run",
}


@dataclass
class DocCommand:
    """One command as a page shows it, with what surrounds it."""

    page: str
    line: int
    text: str
    program: str  # "dam_lightning" or "benchmarks.<name>"
    args: list[str]
    context: str  # the text around it, its own words left out
    earlier: list[DocCommand] = field(default_factory=list)  # before it in the same block

    @property
    def key(self) -> str:
        return " ".join(self.args)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _chunks(text: str) -> list[tuple[str, int, str]]:
    """(kind, first line, text) of a page: 'code' blocks, 'prose' paragraphs, 'heading's."""
    chunks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            chunks.append(("code", i + 2, "\n".join(lines[i + 1 : end])))
            i = end + 1
        elif line.startswith("#"):
            chunks.append(("heading", i + 1, line))
            i += 1
        elif line.strip():
            start = i
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("```", "#")):
                i += 1
            chunks.append(("prose", start + 1, "\n".join(lines[start:i])))
        else:
            i += 1
    return chunks


COMMAND_LINE = re.compile(r"\s*(\$ )?(\S*python3?|srun|torchrun|dam-lightning)\s")


def _parse(words: list[str]) -> tuple[str, list[str]] | None:
    """(program, arguments) of one shell command, or None if it is not one of ours."""
    if words and words[0] == "dam-lightning":
        return "dam_lightning", words[1:]
    if words and words[0] in SUBCOMMANDS:  # inline, without its `python -m dam_lightning`
        return "dam_lightning", words
    for i, word in enumerate(words[:-1]):
        if word == "-m" and re.fullmatch(r"dam_lightning|benchmarks\.\w+", words[i + 1]):
            return words[i + 1], words[i + 2 :]
    return None


def _code_lines(code: str) -> list[tuple[int, str, bool]]:
    """(line offset, line with its continuations joined, is a command line) of a code block."""
    lines, joined, i = code.splitlines(), [], 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        joined.append((start, line, bool(COMMAND_LINE.match(line))))
        i += 1
    return joined


def _commands_in(kind: str, text: str) -> list[tuple[int, str, str, list[str]]]:
    """(line offset, text, program, args) of every command in a chunk."""
    found = []
    if kind == "code":
        for offset, line, is_command in _code_lines(text):
            if not is_command:
                continue
            words = shlex.split(line, comments=True)
            segment: list[str] = []
            for word in [*words, "&&"]:
                if word != "&&":
                    segment.append(word)
                    continue
                parsed = _parse(segment)
                if parsed:
                    found.append((offset, line.split(" #")[0].strip(), *parsed))
                segment = []
    else:
        for span in re.findall(r"`([^`\n]+)`", text):
            try:
                parsed = _parse(shlex.split(span))
            except ValueError:  # unbalanced quotes: a quoted message, not shell words
                continue
            if not parsed:
                continue
            program, args = parsed
            configs = [a for i, a in enumerate(args) if i and args[i - 1] == "--config"]
            if program != "dam_lightning" or any("..." not in c for c in configs):
                found.append((0, span, program, args))  # not a name or a template of one
    return found


def _said(kind: str, text: str) -> str:
    """What a chunk says in words: a code block's comments and other lines, a paragraph without
    its inline commands (a command's own arguments say nothing about what it needs)."""
    if kind == "code":
        return "\n".join(
            line.split(" # ", 1)[1] if is_command and " # " in line else "" if is_command else line
            for _, line, is_command in _code_lines(text)
        )
    for _, span, _, _ in _commands_in(kind, text):
        text = text.replace(f"`{span}`", " ")
    return text


def _doc_commands() -> list[DocCommand]:
    commands = []
    for page in PAGES:
        name = str(page.relative_to(REPO))
        if name in NOT_INSTRUCTIONS:
            continue
        chunks = _chunks(page.read_text())
        for index, (kind, first_line, text) in enumerate(chunks):
            found = _commands_in(kind, text) if kind != "heading" else []
            if not found:
                continue
            around = []  # two chunks before, one after, within the section
            for neighbour in (index - 2, index - 1, index, index + 1):
                if not 0 <= neighbour < len(chunks):
                    continue
                if chunks[neighbour][0] == "heading":
                    if neighbour < index:
                        around = []
                        continue
                    break
                around.append(_said(chunks[neighbour][0], chunks[neighbour][2]))
            context = "\n".join(around)
            block: list[DocCommand] = []
            for offset, words, program, args in found:
                command = DocCommand(
                    name, first_line + offset, words, program, list(args), context, list(block)
                )
                commands.append(command)
                if kind == "code":
                    block.append(command)
    return commands


COMMANDS = _doc_commands()
DAM_COMMANDS = [c for c in COMMANDS if c.program == "dam_lightning"]
BENCHMARK_COMMANDS = [c for c in COMMANDS if c.program.startswith("benchmarks.")]


def _runnable_args(command: DocCommand) -> list[str]:
    """The command's arguments without what ``...`` elides (with the flag whose value it is) and
    without shell variables (multi-node launch values)."""
    args: list[str] = []
    for arg in command.args:
        if "..." in arg or arg.startswith("$"):
            if args and args[-1].startswith("--") and "=" not in args[-1]:
                args.pop()
            continue
        args.append(arg)
    return args


def _walk(node, keys):
    """Every (key, value) under ``node`` whose key is in ``keys``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield key, value
            yield from _walk(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, keys)


def _in_a_fresh_clone(path: str) -> bool:
    if "..." in path or "<" in path:
        return False
    resolved = (REPO / path).resolve()
    if not resolved.is_relative_to(REPO):
        return False
    return resolved.relative_to(REPO).parts[0] not in ABSENT_IN_A_FRESH_CLONE and resolved.exists()


def _needs(command: DocCommand, config: dict) -> list[str]:
    """The files and folders a dam_lightning command reads that a fresh clone lacks."""
    if config.get("synthetic"):  # preflight --synthetic true: stand-ins for the data and weights
        return []
    needs = [root for _, root in _walk(config.get("data", {}), {"root"})]
    needs += [path for _, path in _walk(config.get("model", {}), set(WEIGHT_KEYS))]
    ckpt = config.get("ckpt_path")
    if ckpt:
        needs.append(str(ckpt))
    elif "--ckpt_path" in command.args:  # elided: a checkpoint of some earlier run
        needs.append("runs/.../checkpoints/last.ckpt")
    return sorted({need for need in needs if not _in_a_fresh_clone(need)})


_PRINTED: dict[tuple[str, ...], dict] = {}  # --print_config of the commands parsed so far


def _products(command: DocCommand, capsys) -> tuple[set[str], set[str]]:
    """(files, folder prefixes) an earlier ``fit`` of the same block leaves: the path its
    PublishCheckpoint writes and its run folders ``<save_dir>/<name>/``."""
    if not command.args or command.args[0] != "fit":
        return set(), set()
    key = tuple(_runnable_args(command))
    if key not in _PRINTED:
        _PRINTED[key] = print_config(list(key), capsys)
    config = _PRINTED[key]
    trainer = config["trainer"]
    files = {
        callback["init_args"]["path"]
        for callback in trainer.get("callbacks") or []
        if callback["class_path"].endswith("PublishCheckpoint")
    }
    logger = trainer.get("logger")
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    configs = [a for i, a in enumerate(command.args) if i and command.args[i - 1] == "--config"]
    name = init.get("name") or Path(configs[-1]).stem
    return files, {f"{init.get('save_dir') or trainer.get('default_root_dir') or '.'}/{name}/"}


def _named_around(need: str, context: str) -> bool:
    """Whether the text around a command says it needs ``need``: the path itself, or for a run's
    file, ``runs/<experiment>/`` or the config that makes it."""
    if need in context:
        return True
    match = re.match(r"runs/(\w+)/", need)
    if match:
        return f"runs/{match[1]}/" in context or f"configs/{match[1]}.yaml" in context
    return False


def _satisfied_by_earlier(need: str, command: DocCommand, capsys) -> bool:
    for earlier in command.earlier:
        files, prefixes = _products(earlier, capsys)
        if need in files or any(need.startswith(prefix) for prefix in prefixes):
            return True
        if need.startswith("runs/.../") and prefixes:
            return True
    return False


def test_the_pages_show_commands_and_the_extraction_finds_the_known_ones():
    keys = {c.key for c in DAM_COMMANDS}
    assert "fit --config configs/demo.yaml" in keys  # README's quick start, after `&&`
    assert any(c.text.startswith("srun ") for c in DAM_COMMANDS)
    assert any(c.text.startswith("torchrun ") for c in DAM_COMMANDS)
    assert any(c.args[0] == "diagnose" for c in DAM_COMMANDS if c.page == "README.md")
    assert any(c.program == "benchmarks.sweep" for c in BENCHMARK_COMMANDS)


@pytest.mark.parametrize("command", DAM_COMMANDS, ids=str)
def test_every_dam_lightning_command_parses_and_says_what_it_needs_first(
    command, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    args = _runnable_args(command)
    assert args and not args[0].startswith("-"), f"{command}: no subcommand"
    if args[0] not in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([args[0], "--help"])
        assert exit_info.value.code == 0, f"{command}: {args[0]} is not a command of the CLI"
        return
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            assert (REPO / args[i + 1]).is_file(), f"{command}: {args[i + 1]} does not exist"
    config = _PRINTED[tuple(args)] = print_config(args, capsys)
    unsaid = [
        need
        for need in _needs(command, config)
        if not _satisfied_by_earlier(need, command, capsys)
        and not _named_around(need, command.context)
    ]
    assert unsaid == [], (
        f"{command}\nneeds {unsaid}, which a fresh clone lacks: name each in the text around the "
        "command (or make it by an earlier command of the same block)"
    )


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS, ids=str)
def test_every_benchmark_command_parses_and_says_what_data_it_needs(command, monkeypatch):
    monkeypatch.chdir(REPO)
    module = importlib.import_module(command.program)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [command.program, *command.args])
    with pytest.raises(_Parsed):
        module.main()
    for arg in command.args:
        if re.fullmatch(r"(benchmarks|configs)/\S+\.yaml", arg):
            assert (REPO / arg).is_file(), f"{command}: {arg} does not exist"
    if command.program == "benchmarks.sweep":
        table = (REPO / command.args[0]).read_text()
        roots = {
            root
            for config in set(re.findall(r"configs/[\w/]+\.yaml", table))
            for root in re.findall(r"^\s*root: (\S+)", (REPO / config).read_text(), re.M)
        }
        unsaid = sorted(r for r in roots if not _named_around(r, command.context))
        assert unsaid == [], f"{command}\nits table's configs read {unsaid}: say so beside it"


def _runs_here(command: DocCommand) -> bool:
    if command.program != "dam_lightning" or command.args[0] not in RUN_HERE:
        return False
    return not [need for need in _static_needs(command) if not _made_earlier(need, command)]


def _static_needs(command: DocCommand) -> list[str]:
    """What ``_needs`` finds, read from the config files' text: which commands run is chosen
    when the tests are collected, before any config is parsed."""
    args = _runnable_args(command)
    needs = []
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            text = (REPO / args[i + 1]).read_text()
            needs += re.findall(r"^\s*root: (\S+)", text, re.M)
            needs += re.findall(r"^\s*source_weights: (\S+)", text, re.M)
        if arg in ("--ckpt_path", *(f"--model.init_args.{k}" for k in WEIGHT_KEYS)):
            needs.append(args[i + 1])
        if arg.startswith("--data.") and arg.endswith(".root"):
            needs.append(args[i + 1])
    if "--ckpt_path" in command.args and "--ckpt_path" not in args:
        needs.append("runs/.../checkpoints/last.ckpt")
    return [n for n in needs if n != "null" and not _in_a_fresh_clone(n)]


def _made_earlier(need: str, command: DocCommand) -> bool:
    for earlier in command.earlier:
        if earlier.args[:1] == ["fit"] and _runs_here(earlier):
            config = earlier.args[earlier.args.index("--config") + 1]
            if need.startswith(("runs/.../", f"runs/{Path(config).stem}/")):
                return True
    return False


RUNNABLE = [c for c in DAM_COMMANDS if _runs_here(c)]


def test_what_runs_in_a_fresh_clone_is_run_here_or_by_the_test_named():
    assert {c.key for c in RUNNABLE} >= {
        "fit --config configs/demo.yaml",
        "fit --config configs/seg_demo.yaml",
    }
    for command in RUNNABLE:
        if command.key in RUN_ELSEWHERE:
            path, name = RUN_ELSEWHERE[command.key].split("::")
            assert f"def {name}(" in (REPO / path).read_text(), RUN_ELSEWHERE[command.key]
        else:
            first_config = command.args[command.args.index("--config") + 1]
            assert first_config in TINY, f"{command}: runs in a fresh clone; give it tiny sizes"


def _fill_placeholders(args: list[str], root: Path) -> list[str]:
    """A run's own names (``<date>_<time>``, ``...``) replaced by the run folder made here."""
    filled = []
    for arg in args:
        if "<" in arg or "..." in arg:
            pattern = re.sub(r"<[^>]+>|\.\.\.", "*", arg)
            matches = sorted(glob.glob(str(root / pattern)))
            assert matches, f"nothing in {root} matches {arg}"
            arg = str(Path(matches[-1]).relative_to(root))
        filled.append(arg)
    return filled


def _blocks_to_run() -> list[tuple[str, str]]:
    """(page, context) of each place whose runnable commands run together; a place whose
    commands another place runs as well is left out (the README's demo is in both)."""
    keys: dict[tuple[str, str], set[str]] = {}
    for command in RUNNABLE:
        if command.key not in RUN_ELSEWHERE:
            keys.setdefault((command.page, command.context), set()).add(command.key)
    return [
        block
        for block in sorted(keys, key=str)
        if not any(keys[block] < other or (keys[block] == other and block > place)
                   for place, other in keys.items() if place != block)
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("block", _blocks_to_run(), ids=lambda b: b[0])
def test_the_commands_that_need_nothing_run_on_tiny_sizes(block, tmp_path, monkeypatch, capsys):
    """A fresh clone's working directory (the configs, nothing else); the commands of one code
    block in order, so that validate/test/predict read the checkpoint the fit before them left."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    page, context = block
    commands = [
        c for c in RUNNABLE if (c.page, c.context) == block and c.key not in RUN_ELSEWHERE
    ]
    for command in commands:
        args = _runnable_args(command)
        if "--ckpt_path" in command.args and "--ckpt_path" not in args:
            args += ["--ckpt_path", "runs/.../checkpoints/last.ckpt"]
        args = _fill_placeholders(args, tmp_path)
        first_config = args[args.index("--config") + 1]
        tiny = TINY[first_config]
        if args[0] != "fit":
            tiny = [a for a in tiny if not a.startswith(TRAINING_ONLY)]
        capsys.readouterr()
        main([*args, *tiny])
        out = capsys.readouterr().out
        assert "Run folder: runs/" in out, f"{command}\n{out[-2000:]}"


# The README's Python example at tiny sizes: each (written, tiny) pair must match once.
PYTHON_EXAMPLE_TINY = [
    ("SynDigits(10000, seed=0)", "SynDigits(64, seed=0)"),
    ("batch_size=128", "batch_size=32"),
    ("source_steps=1000", "source_steps=2"),
    ("max_epochs=33,", "max_epochs=2, limit_train_batches=2, enable_progress_bar=False,"),
    ("GaussianMatching()", "GaussianMatching(calibration_batches=1)"),
]


@pytest.mark.slow
def test_the_readme_python_example_writes_its_summary_where_the_readme_says(
    tmp_path, monkeypatch
):
    text = (REPO / "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    for written, tiny in PYTHON_EXAMPLE_TINY:
        assert example.count(written) == 1, written
        example = example.replace(written, tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("summary.*"))
    assert written == [f"lightning_logs/version_0/summary.{ext}" for ext in ("json", "md")]
    said = " ".join(text.split("```python", 1)[1].split("```", 2)[1].split())  # what follows
    assert "`lightning_logs/version_<n>/` in the working directory" in said, said[:300]
