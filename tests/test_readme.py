"""The README's examples run as written: its plugin files and its commands."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from charrnn.cli import main
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def block_saved_as(filename: str) -> str:
    """The python block that follows the sentence telling the reader to save it as `filename`."""
    match = re.search(
        rf"Save (?:this )?as `{re.escape(filename)}`:?\s*\n\s*```python\n(.*?)```", README, re.S
    )
    assert match, f"README has no block to save as {filename}"
    return match.group(1)


def commands_using(word: str) -> list[list[str]]:
    lines = [line for block in code_blocks("bash") for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("charrnn ") and word in line]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text((ROOT / "data" / "input.txt").read_text()[:20000])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    return tmp_path


FAST = ["--set", "train.steps=30", "--set", "train.sample_every=10", "--set", "train.batch_size=4"]


@pytest.mark.slow
def test_readme_sampler_plugin_runs_as_written(workdir, capsys):
    (workdir / "vowel_boost.py").write_text(block_saved_as("vowel_boost.py"))
    run, generate = commands_using("vowel_boost")
    assert run[0] == "run" and generate[0] == "generate"
    assert main([*run, *FAST]) == 0
    out = capsys.readouterr().out
    assert out.startswith("THE ") and len(out) == len("THE ") + 1000 + 1
    assert main(generate) == 0
    out = capsys.readouterr().out
    assert out.startswith("THE ") and len(out) == len("THE ") + 200 + 1
    # generation needs the plugin: without --plugin it is a clear error, not an import
    assert main([a for a in generate if a not in ("--plugin", "vowel_boost.py")]) == 2
    assert "vowel_boost" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_loader_plugin_runs_as_written(workdir, capsys):
    (workdir / "lines_loader.py").write_text(block_saved_as("lines_loader.py"))
    (run,) = commands_using("lines_loader")
    assert main([*run, *FAST]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and out == out.lower()


def test_readme_pipeline_example_is_valid(workdir, capsys):
    example = next(b for b in code_blocks("yaml") if "stages:" in b)
    (workdir / "example.yaml").write_text(example)
    assert main(["run", "example.yaml", "--print-config"]) == 0
    assert "hidden_size: 128" in capsys.readouterr().out


def test_readme_documents_every_default_component():
    from charrnn.plugins import Registry, get_plugin_manager

    registry = Registry(get_plugin_manager(load_entrypoints=False))
    for kind, components in registry.components.items():
        for name in components:
            assert f"| {kind} | `{name}` |" in README, (kind, name)
