"""A failing plugin is named on one line with exit status 1; plugins register once, traced."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import numpy as np
import pytest

import charrnn
from charrnn.cli import main
from charrnn.errors import PluginError, PluginFailure
from charrnn.generate import generate
from charrnn.plugins import Registry, add_plugin, get_plugin_manager

# the README's lines_loader.py, verbatim
LINES_LOADER = '''\
from pathlib import Path

import charrnn


def load_lines(path: str, lowercase: bool = False) -> charrnn.Corpus:
    """Every non-empty line of a file, optionally lowercased."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\\n".join(lines) + "\\n"
    return charrnn.Corpus.from_text(text.lower() if lowercase else text, source=path)


@charrnn.hookimpl
def charrnn_corpus_loader(register):
    register("lines", load_lines)
'''

SAMPLER_PLUGIN = """\
import numpy as np
import charrnn


class Boom:
    def __call__(self, logits, rng):
        raise ZeroDivisionError("boom in the sampler")


class Negative:
    def __call__(self, logits, rng):
        return np.full(logits.shape[0], -1)


class BadSearch:
    def __call__(self, logits, rng):
        return logits.argmax(-1)

    def search(self, model, state, last_ids, num_chars, rng):
        return np.zeros((num_chars + 1,), dtype=np.int64)


@charrnn.hookimpl
def charrnn_sampler(register):
    register("boom", Boom)
    register("negative", Negative)
    register("bad_search", BadSearch)
"""


def one_line_failure(capsys, argv, status=1):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def checkpoint(tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    monkeypatch.delenv("CHARRNN_DEBUG", raising=False)
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=2, sample_every=None)
    charrnn.run_pipeline(tiny_config)
    capsys.readouterr()
    return tiny_config["train"]["checkpoint"]


@pytest.fixture
def pipeline_file(tmp_path, tiny_config, monkeypatch):
    import yaml

    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    monkeypatch.delenv("CHARRNN_DEBUG", raising=False)
    tiny_config["train"]["sample_every"] = None
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def test_readme_loader_with_a_mistyped_path_names_the_plugin(capsys, tmp_path, pipeline_file, monkeypatch):
    loader = tmp_path / "lines_loader.py"
    loader.write_text(LINES_LOADER)
    argv = [
        "run",
        str(pipeline_file),
        "--set",
        f"plugins=[{loader}]",
        "--set",
        f"corpus={{type: lines, path: {tmp_path / 'typo.txt'}}}",
    ]
    line = one_line_failure(capsys, argv)
    assert f"plugin '{loader}' (corpus 'lines') failed: FileNotFoundError:" in line
    assert "typo.txt" in line and "CHARRNN_DEBUG=1" in line

    monkeypatch.setenv("CHARRNN_DEBUG", "1")
    with pytest.raises(PluginFailure) as info:
        main(argv)
    assert isinstance(info.value.__cause__, FileNotFoundError)


class RaisingRegistration:
    @charrnn.hookimpl
    def charrnn_model(self, register):
        raise RuntimeError("half-written plugin")


def test_a_registration_hook_that_raises_names_the_plugin(tiny_config):
    pm = get_plugin_manager(load_entrypoints=False, extra=[RaisingRegistration()])
    with pytest.raises(
        PluginFailure, match=r"plugin 'RaisingRegistration-\d+' \(charrnn_model\) failed: RuntimeError"
    ):
        Registry(pm)
    with pytest.raises(PluginFailure, match="half-written plugin"):
        charrnn.Pipeline(tiny_config, plugins=[RaisingRegistration()])


def test_a_sampler_that_raises_names_the_plugin(capsys, checkpoint, tmp_path):
    plugin = tmp_path / "samplers_plugin.py"
    plugin.write_text(SAMPLER_PLUGIN)
    line = one_line_failure(capsys, ["generate", checkpoint, "--plugin", str(plugin), "--sampler", "boom"])
    assert f"plugin '{plugin}' (sampler 'boom') failed: ZeroDivisionError: boom in the sampler" in line


def test_negative_ids_from_a_sampler_are_a_failure_not_the_last_character(capsys, checkpoint, tmp_path):
    plugin = tmp_path / "samplers_plugin.py"
    plugin.write_text(SAMPLER_PLUGIN)
    argv = ["generate", checkpoint, "--plugin", str(plugin), "--sampler", "negative", "--num-chars", "5"]
    line = one_line_failure(capsys, argv)
    assert "(sampler 'negative') failed: returned" in line and "expected integer ids in [0," in line


def test_search_returning_the_wrong_shape_names_the_plugin(capsys, checkpoint, tmp_path):
    plugin = tmp_path / "samplers_plugin.py"
    plugin.write_text(SAMPLER_PLUGIN)
    argv = ["generate", checkpoint, "--plugin", str(plugin), "--sampler", "bad_search", "--num-chars", "5"]
    line = one_line_failure(capsys, argv)
    assert "(sampler 'bad_search') failed: search returned" in line and "of shape (1, 5)" in line


def test_ids_are_checked_once_per_chunk_even_when_the_model_accepts_them(tiny_config, checkpoint):
    loaded = charrnn.Pipeline(tiny_config).load(checkpoint)
    model, vocab = loaded.model, loaded.vocab
    V = len(vocab.vocab)

    def wraps(logits, rng):  # -1 indexes the last row of Wxh: the model does not complain
        return np.array([-1])

    def too_big_later(logits, rng, calls=[]):  # noqa: B006 - counts calls
        calls.append(1)
        return np.array([V if len(calls) == 3 else 0])

    for sampler in (wraps, too_big_later):
        with pytest.raises(PluginFailure, match=rf"sampler '{sampler.__name__}' failed: returned"):
            generate(model, sampler, vocab, np.random.default_rng(0), "the ", 10, chunk_chars=4)


class BrokenModelStep:
    """Wraps a model whose step raises: the model, not the sampler, is named."""

    def __init__(self, model):
        self.model, self.params, self.init_state = model, model.params, model.init_state

    def step(self, ids, state):
        raise KeyError("state key")


def test_a_model_that_raises_while_generating_is_named(tiny_config, checkpoint):
    loaded = charrnn.Pipeline(tiny_config).load(checkpoint)
    model, vocab = loaded.model, loaded.vocab
    with pytest.raises(PluginFailure, match=r"model 'BrokenModelStep' failed: KeyError"):
        generate(BrokenModelStep(model), lambda z, r: z.argmax(-1), vocab, np.random.default_rng(0), "", 3)


def test_plugin_path_that_is_not_python_is_a_user_error(capsys, checkpoint, tmp_path, monkeypatch):
    text = tmp_path / "x.txt"
    text.write_text("hello\n")
    line = one_line_failure(capsys, ["generate", checkpoint, "--plugin", str(text)], status=2)
    assert "x.txt is not a .py file" in line
    monkeypatch.chdir(tmp_path)
    line = one_line_failure(capsys, ["generate", checkpoint, "--plugin", "x.txt"], status=2)
    assert line.startswith("error: plugin file x.txt is not a .py file")


def test_a_core_bug_is_one_line_with_the_debug_hint(capsys, pipeline_file, monkeypatch):
    def broken(self, *args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(charrnn.Pipeline, "run", broken)
    line = one_line_failure(capsys, ["run", str(pipeline_file)])
    assert "internal error: AttributeError: 'NoneType' object has no attribute 'shape'" in line
    assert "set CHARRNN_DEBUG=1 for the traceback" in line
    monkeypatch.setenv("CHARRNN_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["run", str(pipeline_file)])


# -- one module registers once (defect 14) ------------------------------------------------

VOWEL_BOOST = """\
import numpy as np
import charrnn


class VowelBoost:
    def __call__(self, logits, rng):
        return logits.argmax(-1)


@charrnn.hookimpl
def charrnn_sampler(register):
    register("vowel_boost", VowelBoost)
"""


def _install_entry_point(monkeypatch, path):
    """As after `pip install .` of the README's package: entry point `vowel_boost` -> the module."""
    spec = importlib.util.spec_from_file_location("vowel_boost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "vowel_boost", module)

    class EP:
        name = "vowel_boost"
        group = "charrnn"
        value = "vowel_boost"

        def load(self):
            return module

    class Dist:
        entry_points = [EP()]
        metadata = {"Name": "charrnn-vowel-boost"}
        version = "0.1.0"

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [Dist()])
    monkeypatch.delenv("CHARRNN_LOAD_PLUGINS", raising=False)


def test_installed_plugin_named_again_by_its_file_registers_once(capsys, checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "vowel_boost.py"
    path.write_text(VOWEL_BOOST)
    _install_entry_point(monkeypatch, path)
    pm = get_plugin_manager(extra=[str(path)])
    assert "vowel_boost" in Registry(pm).components["sampler"]
    monkeypatch.chdir(tmp_path)
    argv = [
        "generate",
        checkpoint,
        "--plugin",
        "vowel_boost.py",
        "--sampler",
        "vowel_boost",
        "--num-chars",
        "7",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out) == len("the ") + 7 + 1


def test_an_installed_copy_of_the_file_registers_once_but_an_edited_copy_clashes(tmp_path, monkeypatch):
    """`pip install .` copies vowel_boost.py into site-packages; the README still names the original."""
    (tmp_path / "site").mkdir()
    installed = tmp_path / "site" / "vowel_boost.py"
    installed.write_text(VOWEL_BOOST)
    _install_entry_point(monkeypatch, installed)
    (tmp_path / "vowel_boost.py").write_text(VOWEL_BOOST)
    monkeypatch.chdir(tmp_path)
    pm = get_plugin_manager(extra=["vowel_boost.py"])
    assert Registry(pm).components["sampler"]["vowel_boost"].plugin == "vowel_boost"
    (tmp_path / "vowel_boost.py").write_text(VOWEL_BOOST + "# edited since it was installed\n")
    with pytest.raises(charrnn.PluginError, match="registered twice.*'vowel_boost'.*'vowel_boost.py'"):
        Registry(get_plugin_manager(extra=["vowel_boost.py"]))


def test_the_same_file_named_twice_registers_once(tmp_path, monkeypatch):
    path = tmp_path / "vowel_boost.py"
    path.write_text(VOWEL_BOOST)
    monkeypatch.chdir(tmp_path)
    pm = get_plugin_manager(load_entrypoints=False, extra=["vowel_boost.py", str(path), "./vowel_boost.py"])
    assert Registry(pm).components["sampler"]["vowel_boost"].plugin == "vowel_boost.py"
    before = len(pm.get_plugins())
    add_plugin(pm, str(path))
    assert len(pm.get_plugins()) == before


def test_two_different_files_with_one_name_still_clash(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "vowel_boost.py").write_text(VOWEL_BOOST + f"# version {sub}\n")
    pm = get_plugin_manager(
        load_entrypoints=False, extra=[tmp_path / "a" / "vowel_boost.py", tmp_path / "b" / "vowel_boost.py"]
    )
    with pytest.raises(charrnn.PluginError, match="registered twice"):
        Registry(pm)


# -- tracing sees the registration hooks (defect 18) ---------------------------------------


def test_trace_shows_every_registration_hook_and_keeps_ownership(monkeypatch, capsys):
    monkeypatch.setenv("CHARRNN_TRACE_PLUGINS", "1")
    pm = get_plugin_manager(load_entrypoints=False)
    registry = Registry(pm)
    err = capsys.readouterr().err
    for hook in (
        "charrnn_corpus_loader",
        "charrnn_model",
        "charrnn_optimizer",
        "charrnn_sampler",
        "charrnn_schedule",
    ):
        assert hook in err, hook
    assert "register[charrnn_plugins.lstm]" in err
    assert registry.components["model"]["lstm"].plugin == "charrnn_plugins.lstm"
    assert registry.components["sampler"]["beam"].plugin == "charrnn_plugins.beam"


class BadIdsLoader:
    """A loader whose ids do not fit its vocabulary: -1 would silently train on the last symbol."""

    @charrnn.hookimpl
    def charrnn_corpus_loader(self, register):
        def load(bad: int = -1):
            ids = np.tile(np.array([0, 1, 0, 1], dtype=np.int64), 50)
            ids[7] = bad
            return charrnn.Corpus(ids, ["a", "b"], "bad ids")

        register("bad_ids", load)


@pytest.mark.parametrize("bad", [-1, 2])
def test_corpus_ids_outside_the_vocabulary_are_a_failure(tiny_config, bad):
    tiny_config["corpus"] = {"type": "bad_ids", "bad": bad, "val_fraction": 0.1}
    pipeline = charrnn.Pipeline(tiny_config, plugins=[BadIdsLoader()])
    with pytest.raises(
        PluginFailure, match=r"\(corpus 'bad_ids'\) failed: returned a Corpus whose ids .*\[0, 2\)"
    ):
        pipeline.data()


@pytest.mark.parametrize("name", ["", " ", ".hidden_module"])
def test_an_empty_or_relative_plugin_name_is_the_users_mistake_on_every_path(
    capsys, checkpoint, tmp_path, name
):
    import yaml

    lines = [
        one_line_failure(capsys, ["plugins", "--plugin", name], status=2),
        one_line_failure(capsys, ["generate", checkpoint, "--plugin", name], status=2),
        one_line_failure(capsys, ["serve", checkpoint, "--port", "0", "--plugin", name], status=2),
    ]
    for line in lines:
        assert line.startswith(("error: empty plugin name", "error: plugin name")) and repr(name) in line
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"plugins": [name], "stages": ["train"]}), encoding="utf-8")
    for argv in (["run", str(pipeline)], ["run", str(pipeline), "--set", f"plugins=[{name!r}]"]):
        line = one_line_failure(capsys, argv, status=2)
        assert "plugins[0]" in line or repr(name) in line, line
    with pytest.raises(PluginError, match="plugin name"):
        get_plugin_manager(load_entrypoints=False, extra=[name])
