from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import sys
import types
from typing import Annotated

import numpy as np
import pluggy
import pytest
import yaml

import charrnn
from charrnn import hookspecs
from charrnn.cli import main
from charrnn.errors import ConfigError, PluginError, PluginFailure
from charrnn.options import Range
from charrnn.pipeline import Pipeline, run_pipeline
from charrnn.plugins import DEFAULT_PLUGINS, Registry, get_plugin_manager, list_plugins
from conftest import TINY_TEXT, FrozenPlugin


class FirstChar:
    """A sampler that always picks id 0 (the smallest character)."""

    def __init__(self, unused: int = 0) -> None:
        self.bound = None

    def bind(self, vocab):
        self.bound = list(vocab)

    def __call__(self, logits, rng):
        return np.zeros(logits.shape[0], dtype=np.int64)


class SamplerPlugin:
    @charrnn.hookimpl
    def charrnn_sampler(self, register):
        register("first_char", FirstChar)


def test_builtins_registered_without_entrypoints(pm):
    names = {name for name, _ in pm.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= names
    registry = Registry(pm)
    assert "text" in registry.components["corpus"]
    assert "rnn" in registry.components["model"]
    assert "adagrad" in registry.components["optimizer"]
    assert "temperature" in registry.components["sampler"]


def test_every_hookspec_has_a_test_and_a_readme_section():
    specs = [
        name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("charrnn_")
    ]
    assert len(specs) >= 4
    here = sys.modules[__name__]
    readme = (__import__("pathlib").Path(__file__).parent.parent / "README.md").read_text()
    for name in specs:
        assert hasattr(here, f"test_hook_{name}"), f"no test_hook_{name}"
        assert f"`{name}`" in readme, f"README does not document {name}"


def test_hook_charrnn_sampler(tiny_config):
    tiny_config["sampler"] = {"type": "first_char"}
    tiny_config["stages"] = ["train", "generate"]
    result = run_pipeline(tiny_config, plugins=[SamplerPlugin()])
    vocab_first = sorted(set(TINY_TEXT))[0]
    assert result.text == "the " + vocab_first * 50


def test_hook_charrnn_corpus_loader(tiny_config):
    calls = []

    class Loader:
        @charrnn.hookimpl
        def charrnn_corpus_loader(self, register):
            def load(repeat: int = 50, word: str = "abc "):
                calls.append((repeat, word))
                return charrnn.Corpus.from_text(word * repeat, source="generated")

            register("repeat", load)

    tiny_config["corpus"] = {"type": "repeat", "repeat": 60, "word": "xyz ", "val_fraction": 0.1}
    tiny_config["generate"]["seed_text"] = "x"
    result = run_pipeline(tiny_config, plugins=[Loader()])
    assert calls == [(60, "xyz ")]
    assert set(result.text) <= set("xyz ")
    assert len(result.text) == 1 + 50


def test_hook_charrnn_model(tiny_config):
    class Bigram:
        """A bigram table: logits for the next char depend only on the current one."""

        def __init__(self, vocab_size, rng, scale: float = 0.0):
            self.params = {"W": rng.standard_normal((vocab_size, vocab_size)) * scale}

        def init_state(self, batch_size):
            return {}

        def _probs(self, inputs):
            z = self.params["W"][inputs]
            z = z - z.max(-1, keepdims=True)
            p = np.exp(z)
            return p / p.sum(-1, keepdims=True)

        def loss(self, inputs, targets, state):
            p = self._probs(inputs)
            return float(-np.log(np.take_along_axis(p, targets[..., None].astype(int), -1)).mean()), state

        def train_step(self, inputs, targets, state):
            p = self._probs(inputs)
            loss = float(-np.log(np.take_along_axis(p, targets[..., None].astype(int), -1)).mean())
            d = p.copy()
            np.put_along_axis(
                d,
                targets[..., None].astype(int),
                np.take_along_axis(d, targets[..., None].astype(int), -1) - 1,
                -1,
            )
            g = np.zeros_like(self.params["W"])
            np.add.at(g, inputs.astype(int), d / inputs.size)
            return charrnn.StepResult(loss, {"W": g}, state)

        def step(self, ids, state):
            return self.params["W"][ids], state

    class ModelPlugin:
        @charrnn.hookimpl
        def charrnn_model(self, register):
            register("bigram", Bigram)

    tiny_config["model"] = {"type": "bigram"}
    tiny_config["train"]["steps"] = 60
    result = run_pipeline(tiny_config, plugins=[ModelPlugin()])
    assert result.train.train_loss < np.log(len(set(TINY_TEXT)))
    assert len(result.text) == 4 + 50


def test_hook_charrnn_optimizer(tiny_config):
    steps = []

    class Frozen:
        def __init__(self):
            self.count = np.zeros(1)

        def step(self, params, grads):
            steps.append(sorted(grads))
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"].copy()

    class OptPlugin:
        @charrnn.hookimpl
        def charrnn_optimizer(self, register):
            register("frozen", Frozen)

    tiny_config["optimizer"] = {"type": "frozen"}
    tiny_config["stages"] = ["train"]
    result = run_pipeline(tiny_config, plugins=[OptPlugin()])
    assert len(steps) == 20 and steps[0] == ["Whh", "Why", "Wxh", "bh", "by"]
    assert result.train.steps == 20
    with np.load(tiny_config["train"]["checkpoint"], allow_pickle=False) as saved:
        assert saved["optim/count"][0] == 20


def test_hook_charrnn_train_report(tiny_config):
    reports = []

    class Reporter:
        @charrnn.hookimpl
        def charrnn_train_report(self, step, metrics):
            reports.append((step, metrics))

    run_pipeline(tiny_config, plugins=[Reporter()])
    assert [s for s, _ in reports] == [10, 20]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"]) for _, m in reports)
    assert len(reports[0][1]["sample"]) == 20


def test_hook_charrnn_checkpoint_saved(tiny_config):
    saved = []

    class Watcher:
        @charrnn.hookimpl
        def charrnn_checkpoint_saved(self, path, step):
            saved.append((path, step))

    tiny_config["train"]["save_every"] = 5
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config, plugins=[Watcher()])
    path = tiny_config["train"]["checkpoint"]
    assert [(p, s) for p, s in saved if p == path] == [(path, 5), (path, 10), (path, 15), (path, 20)]
    best = path.replace(".npz", ".best.npz")
    best_steps = [s for p, s in saved if p == best]
    assert len(best_steps) + 4 == len(saved)  # no third path
    # the first evaluation (step 10) is always the best so far; step 20 is saved only if it improved
    assert best_steps in ([10], [10, 20])
    with np.load(best) as data:
        assert json.loads(str(data["meta"]))["step"] == best_steps[-1]


def test_bad_hook_signature_is_rejected():
    class Bad:
        @charrnn.hookimpl
        def charrnn_sampler(self, register, nonsense):
            pass

    pm = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(Bad())
    with pytest.raises(PluginError, match="invalid"):
        get_plugin_manager(load_entrypoints=False, extra=[Bad()])


def test_misspelled_hook_fails_check_pending():
    class Typo:
        @charrnn.hookimpl
        def charrnn_samplr(self, register):
            pass

    with pytest.raises(PluginError, match="charrnn_samplr"):
        get_plugin_manager(load_entrypoints=False, extra=[Typo()])


def test_duplicate_component_names_both_plugins():
    class Dup:
        @charrnn.hookimpl
        def charrnn_sampler(self, register):
            register("temperature", FirstChar)

    pm = get_plugin_manager(load_entrypoints=False, extra=[Dup()])
    with pytest.raises(PluginError, match=r"registered twice.*charrnn_plugins.samplers.*Dup"):
        Registry(pm)


def test_unknown_component_lists_available(tiny_config):
    tiny_config["sampler"] = {"type": "temperatur"}
    with pytest.raises(PluginError, match=r"did you mean 'temperature'.*available: .*temperature"):
        Pipeline(tiny_config)


def _fake_distribution(monkeypatch, module_name, module, version="1.2.3"):
    sys.modules[module_name] = module

    class EP:
        name = "vowels"
        group = "charrnn"
        value = module_name

        def load(self):
            return module

    class Dist:
        entry_points = [EP()]
        metadata = {"Name": "charrnn-vowels", "name": "charrnn-vowels"}
        version = "1.2.3"
        name = "charrnn-vowels"

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [Dist()])


def test_entrypoint_plugins_are_loaded_and_listed(monkeypatch, capsys):
    module = types.ModuleType("charrnn_vowels_test")

    @charrnn.hookimpl
    def charrnn_sampler(register):
        register("first_char", FirstChar)

    module.charrnn_sampler = charrnn_sampler
    _fake_distribution(monkeypatch, "charrnn_vowels_test", module)
    monkeypatch.delenv("CHARRNN_LOAD_PLUGINS", raising=False)
    pm = get_plugin_manager()
    assert "first_char" in Registry(pm).components["sampler"]
    listing = {p["name"]: p for p in list_plugins(pm)}
    assert listing["vowels"]["components"] == {"sampler": {"first_char": {"unused": 0}}}
    assert listing["vowels"]["version"] == "1.2.3"
    assert main(["plugins"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(p["name"] == "vowels" for p in out)

    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    assert "first_char" not in Registry(get_plugin_manager()).components["sampler"]


def test_broken_entrypoint_plugin_is_named(monkeypatch):
    class EP:
        name = "broken"
        group = "charrnn"
        value = "charrnn_broken"

        def load(self):
            raise ImportError("no module named numpyy")

    class Dist:
        entry_points = [EP()]
        metadata = {"Name": "charrnn-broken"}

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [Dist()])
    monkeypatch.delenv("CHARRNN_LOAD_PLUGINS", raising=False)
    with pytest.raises(
        PluginFailure,
        match=r"plugin 'broken' \(entry point charrnn_broken, importing it\) failed: ImportError: .*numpyy",
    ):
        get_plugin_manager()  # a bug in the installed plugin (exit 1), not in the user's input


def test_plugins_listing_shows_default_components(capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    assert main(["plugins"]) == 0
    listing = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listing["charrnn_plugins.rnn"]["components"]["model"]["rnn"]["hidden_size"] == 128
    assert listing["charrnn_plugins.text"]["components"]["corpus"]["text"]["path"] == "required"
    adagrad = listing["charrnn_plugins.adagrad"]["components"]["optimizer"]["adagrad"]
    assert adagrad["lr"] == 0.1 and adagrad["clip"] == 5.0
    assert listing["charrnn_plugins.text"]["hooks"] == ["charrnn_corpus_loader"]


def test_plugin_from_yaml_path(tmp_path, tiny_config):
    plugin = tmp_path / "my_sampler.py"
    plugin.write_text(
        "import numpy as np\nimport charrnn\n\n"
        "class Last:\n    def __call__(self, logits, rng):\n"
        "        return np.full(logits.shape[0], logits.shape[1] - 1)\n\n"
        "@charrnn.hookimpl\ndef charrnn_sampler(register):\n    register('last_char', Last)\n"
    )
    tiny_config["plugins"] = [str(plugin)]
    tiny_config["sampler"] = {"type": "last_char"}
    result = run_pipeline(tiny_config)
    last = sorted(set(TINY_TEXT))[-1]
    assert result.text == "the " + last * 50


def test_plugin_module_that_fails_to_import_is_named(tmp_path, tiny_config):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import numpyy\n")
    tiny_config["plugins"] = [str(plugin)]
    with pytest.raises(
        PluginFailure, match=r"broken_plugin.py \(importing it\) failed: ModuleNotFoundError.*numpyy"
    ):
        Pipeline(tiny_config)  # the plugin's own import raised: its bug, exit 1
    tiny_config["plugins"] = ["no_such_plugin_module"]
    with pytest.raises(PluginError, match="'no_such_plugin_module' not found"):
        Pipeline(tiny_config)


def test_hook_charrnn_schedule(tiny_config):
    seen = []

    class Halving:
        def __call__(self, step, total_steps):
            seen.append((step, total_steps))
            return 0.5**step

    class SchedulePlugin:
        @charrnn.hookimpl
        def charrnn_schedule(self, register):
            register("halving", Halving)

    tiny_config["schedule"] = {"type": "halving"}
    tiny_config["train"].update(steps=4, sample_every=1)
    result = run_pipeline(tiny_config, plugins=[SchedulePlugin()])
    assert seen[-4:] == [(0, 4), (1, 4), (2, 4), (3, 4)]  # after a check of step 0 before training
    assert [h["lr"] for h in result.train.history] == [0.1, 0.05, 0.025, 0.0125]


@dataclasses.dataclass
class Greeting:
    """A plugin's own pipeline section: `greeting: {text: ..., times: ...}`."""

    text: Annotated[str, "what to say"] = "hi"
    times: Annotated[int, Range(ge=1, le=3), "how often"] = 1


class GreetingPlugin:
    def __init__(self):
        self.seen = []

    @charrnn.hookimpl
    def charrnn_section(self, register):
        register("greeting", Greeting)

    @charrnn.hookimpl
    def charrnn_train_start(self, config, checkpoint, step):
        self.seen.append(config["greeting"])


def test_hook_charrnn_section(tiny_config, tmp_path):
    plugin = GreetingPlugin()
    tiny_config["train"]["steps"] = 2
    run_pipeline({**tiny_config, "greeting": {"times": 2}}, plugins=[plugin])
    assert plugin.seen == [{"text": "hi", "times": 2}]  # checked, defaults filled, handed to the plugin
    run_pipeline(tiny_config, plugins=[plugin])
    assert plugin.seen[-1] == {"text": "hi", "times": 1}  # absent: all defaults
    path = tmp_path / "p.yaml"
    config = {**tiny_config, "greeting": {"times": 5}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "times" in t)
    with pytest.raises(
        ConfigError, match=rf"p.yaml: line {line}: greeting.times: must be in \[1, 3\], got 5$"
    ):
        Pipeline(str(path), plugins=[plugin])
    with pytest.raises(ConfigError, match=r"greeting.txt: unknown key \(did you mean 'text'\?\)"):
        Pipeline({**tiny_config, "greeting": {"txt": "yo"}}, plugins=[plugin])
    with pytest.raises(ConfigError, match=r"greeting: unknown key; known keys: seed, plugins"):
        Pipeline({**tiny_config, "greeting": {}})  # without the plugin the section is unknown

    class Squatter:
        @charrnn.hookimpl
        def charrnn_section(self, register):
            register("train", Greeting)

    with pytest.raises(PluginError, match="registered a section 'train': the pipeline owns that key"):
        Pipeline(tiny_config, plugins=[Squatter()])
    with pytest.raises(PluginError, match="section 'greeting' is registered twice"):
        Pipeline(tiny_config, plugins=[plugin, GreetingPlugin()])


class Hello:
    """A third-party command: `charrnn hello NAME [--shout]`."""

    help = "say hello"

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--shout", action="store_true")

    def __call__(self, args, out):
        if args.name == "nobody":
            raise charrnn.CharrnnError("hello: nobody is not a name")
        out.write(("HELLO " if args.shout else "hello ") + args.name + "\n")
        return 0


def test_hook_charrnn_command(monkeypatch, capsys):
    module = types.ModuleType("charrnn_hello_test")

    @charrnn.hookimpl
    def charrnn_command(register):
        register("hello", Hello)

    module.charrnn_command = charrnn_command
    _fake_distribution(monkeypatch, "charrnn_hello_test", module)
    monkeypatch.delenv("CHARRNN_LOAD_PLUGINS", raising=False)
    assert main(["hello", "ada", "--shout"]) == 0
    assert capsys.readouterr().out == "HELLO ada\n"
    assert main(["hello", "nobody"]) == 2  # its user errors are one line, status 2, as the builtins'
    assert capsys.readouterr().err == "error: hello: nobody is not a name\n"
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "hello" in help_text and "say hello" in help_text
    listing = {p["name"]: p for p in list_plugins(get_plugin_manager())}
    assert listing["vowels"]["components"] == {"command": {"hello": {}}}
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")  # turned off, the command is gone
    assert main(["hello", "ada"]) == 2
    assert "invalid choice: 'hello'" in capsys.readouterr().err


def test_builtin_commands_are_registered_plugins():
    commands = Registry(get_plugin_manager(load_entrypoints=False)).components["command"]
    builtins = {"run", "generate", "bench", "gradcheck", "plot", "plugins"}
    assert set(commands) >= builtins
    assert {commands[name].plugin for name in builtins} == {"charrnn.commands"}


class RunLog:
    def __init__(self):
        self.events = []

    @charrnn.hookimpl
    def charrnn_train_start(self, config, checkpoint, step):
        self.events.append(("start", config["train"]["steps"], checkpoint, step))

    @charrnn.hookimpl
    def charrnn_train_end(self, checkpoint, step, metrics, reason):
        self.events.append(("end", step, reason, metrics["val_loss"] is not None))


def test_hook_charrnn_train_start(tiny_config):
    log = RunLog()
    run_pipeline(tiny_config, plugins=[log])
    path = tiny_config["train"]["checkpoint"]
    assert log.events == [("start", 20, path, 0), ("end", 20, "steps", True)]
    tiny_config["train"].update(resume=True, steps=30)
    log.events.clear()
    run_pipeline(tiny_config, plugins=[log])
    assert log.events[0] == ("start", 30, path, 20)


def test_hook_charrnn_train_end(tiny_config):
    log = RunLog()
    tiny_config["train"].update(patience=1, sample_every=2, steps=400)
    tiny_config["optimizer"] = {"type": "frozen"}
    run_pipeline(tiny_config, plugins=[log, FrozenPlugin()])  # the val loss cannot improve
    assert log.events[-1][0] == "end" and log.events[-1][2] == "early stopping"


class RNNUnderAnotherName:
    """A third-party model type (the builtin RNN as `my_rnn`) with an exporter of its own."""

    def __init__(self, network=None, error=None):
        self.seen, self.network, self.error = [], network, error

    @charrnn.hookimpl
    def charrnn_model(self, register):
        from charrnn_plugins.rnn import RNN

        register("my_rnn", RNN)

    @charrnn.hookimpl
    def charrnn_exporter(self, register):
        register("my_rnn", self.export)

    def export(self, model):
        from charrnn_plugins.rnn import export_network

        self.seen.append(model)
        if self.error is not None:
            raise self.error
        return export_network(model) if self.network is None else self.network


def test_hook_charrnn_exporter(tiny_config, tmp_path):
    from charrnn_plugins.export import ExportError, export, load

    plugin = RNNUnderAnotherName()
    tiny_config["model"] = {"type": "my_rnn", "hidden_size": 8}
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config, plugins=[plugin])
    path = tiny_config["train"]["checkpoint"]
    source = load(path, plugins=[plugin])
    (model,) = plugin.seen  # called once, with the trained model
    saved = np.load(path)
    np.testing.assert_array_equal(model.params["Whh"], saved["param/Whh"])
    np.testing.assert_array_equal(source.network.layers[0].R, saved["param/Whh"].T)  # ONNX's R is Whh.T
    done = export(path, tmp_path / "m.html", plugins=[plugin])
    assert (
        done.summary.startswith("my_rnn, 1 layer of 8, ")
        and done.size == (tmp_path / "m.html").stat().st_size
    )
    # what an exporter returns is checked: a wrong shape is that plugin's failure, named
    bad = RNNUnderAnotherName(network=source.network)
    bad.network.layers[0].W = bad.network.layers[0].W[:, :-1]
    with pytest.raises(PluginFailure, match=r"exporter 'my_rnn'\) failed: returned layer 0: W of shape"):
        load(path, plugins=[bad])
    # a model it cannot express is the user's one-line error
    refusing = RNNUnderAnotherName(error=ValueError("tied weights have no ONNX operator"))
    with pytest.raises(ExportError, match=r"model 'my_rnn' cannot be exported: tied weights have no ONNX"):
        load(path, plugins=[refusing])
    # two exporters for one model type: both plugins are named
    with pytest.raises(
        PluginError, match=r"exporter 'rnn' is registered twice: by plugin 'charrnn_plugins.rnn'"
    ):

        class Second:
            @charrnn.hookimpl
            def charrnn_exporter(self, register):
                register("rnn", lambda model: None)

        Registry(get_plugin_manager(load_entrypoints=False, extra=[Second()]))
