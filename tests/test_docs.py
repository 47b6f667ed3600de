"""The docs are part of the product: commands in the README are the ones CI runs, every
config is documented, every public class has a docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import dam_lightning

from .conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    demo, tests = commands
    assert "fit --config configs/demo.yaml" in demo
    assert "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_config_is_documented():
    documented = (REPO / "README.md").read_text() + (REPO / "docs/configuration.md").read_text()
    for config in (REPO / "configs").glob("*.yaml"):
        assert f"configs/{config.name}" in documented, config.name


def test_every_public_class_and_function_has_a_docstring():
    missing = []
    for info in pkgutil.walk_packages(dam_lightning.__path__, "dam_lightning."):
        module = importlib.import_module(info.name)
        assert module.__doc__, f"module {info.name} has no docstring"
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not obj.__doc__:
                missing.append(f"{info.name}.{name}")
    assert missing == []


def test_every_relative_link_in_the_docs_points_at_a_file_that_exists():
    broken = []
    for page in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []
