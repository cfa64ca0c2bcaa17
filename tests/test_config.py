from __future__ import annotations

import pytest

from charrnn import config as cfg
from charrnn.errors import ConfigError
from charrnn.pipeline import Pipeline


def test_overrides_parse_yaml_and_create_sections():
    raw = {"train": {"steps": 5}}
    cfg.apply_overrides(
        raw,
        [
            "train.steps=200",
            "sampler.temperature=0.5",
            "corpus={type: text, path: x.txt}",
            "train.resume=true",
            "generate.seed_text=hello world",
        ],
    )
    assert raw == {
        "train": {"steps": 200, "resume": True},
        "sampler": {"temperature": 0.5},
        "corpus": {"type": "text", "path": "x.txt"},
        "generate": {"seed_text": "hello world"},
    }


def test_override_into_a_non_section_is_an_error():
    with pytest.raises(ConfigError, match="seed is not a section"):
        cfg.apply_overrides({"seed": 1}, ["seed.x=2"])


def test_defaults_fill_in(tiny_config):
    del tiny_config["optimizer"], tiny_config["sampler"]
    config = Pipeline(tiny_config).config
    assert config["optimizer"] == {"type": "adagrad", "lr": 0.1, "eps": 1e-8, "clip": 5.0, "clip_norm": None}
    assert config["sampler"]["type"] == "temperature" and config["sampler"]["temperature"] == 1.0
    assert config["train"]["save_every"] is None


def test_component_by_name_alone(tiny_config):
    tiny_config["sampler"] = "temperature"
    assert Pipeline(tiny_config).config["sampler"]["type"] == "temperature"


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("seed: 1\ntrain:\n  steps: 10\n  batch_sise: 4\n")
    with pytest.raises(
        ConfigError, match=r"line 4: train.batch_sise: unknown key \(did you mean 'batch_size'\?\)"
    ):
        Pipeline(path)
    path.write_text("seed: 1\ntrain: {steps: 10\n")
    with pytest.raises(ConfigError, match=r"line \d: malformed YAML"):
        Pipeline(path)


def test_types_are_checked(tiny_config):
    tiny_config["train"]["batch_size"] = 2.5
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer, got 2.5"):
        Pipeline(tiny_config)
    tiny_config["train"]["batch_size"] = True
    with pytest.raises(ConfigError, match="expected an integer, got true"):
        Pipeline(tiny_config)
    tiny_config["train"]["batch_size"] = 4
    tiny_config["model"]["hidden_size"] = "big"
    with pytest.raises(ConfigError, match="model.hidden_size: expected an integer, got 'big'"):
        Pipeline(tiny_config)


def run_error(capsys, argv):
    """The CLI's exit status and its one stderr line."""
    from charrnn.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, err)
    return err


def write_pipeline(tmp_path, corpus_file, extra=""):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"seed: 1\ncorpus: {{type: text, path: {corpus_file}}}\nmodel: {{type: rnn, hidden_size: 8}}\n"
        f"train: {{steps: 2, batch_size: 2, seq_length: 4, sample_every: null, "
        f"checkpoint: {tmp_path / 'm.npz'}}}\n{extra}",
        encoding="utf-8",
    )
    return path


def test_keys_yaml_reads_as_booleans_or_numbers_are_refused_with_the_line(tmp_path, corpus_file, capsys):
    path = write_pipeline(tmp_path, corpus_file, "sampler: {type: temperature, no: 1}\n")
    err = run_error(capsys, ["run", str(path)])
    assert "line 5: sampler.no: YAML reads this key as false" in err and "quote it: 'no'" in err
    err = run_error(
        capsys, ["run", str(write_pipeline(tmp_path, corpus_file)), "--set", "model={type: rnn, 3: 1}"]
    )
    assert "YAML reads this key as 3" in err
    with pytest.raises(ConfigError, match=r"line 1: a key must be a name, got a list"):
        cfg.parse_yaml("? [1]\n: 2\n")
    with pytest.raises(ConfigError, match=r"model: the key 1 is not a name"):
        cfg.validate({"model": {"type": "rnn", 1: 2}})


def test_duplicate_keys_name_both_lines():
    with pytest.raises(ConfigError, match=r"^p: line 5: train.steps: duplicate key \(first at line 3\)$"):
        cfg.parse_yaml("seed: 1\ntrain:\n  steps: 2\n  batch_size: 2\n  steps: 3\n", "p: ")
    with pytest.raises(ConfigError, match=r"line 2: seed: duplicate key \(first at line 1\)"):
        cfg.parse_yaml("seed: 1\nseed: 1\n")
    assert cfg.parse_yaml("a: &x {b: 1}\nc: {<<: *x, b: 2}\n")[0] == {"a": {"b": 1}, "c": {"b": 2}}


def test_recursive_aliases_deep_nesting_and_alias_bombs_are_refused():
    with pytest.raises(ConfigError, match=r"line 1: .*recursive YAML alias"):
        cfg.parse_yaml("seed: &a {x: *a}\n")
    with pytest.raises(ConfigError, match=r"line 1: .*recursive YAML alias"):
        cfg.parse_yaml("a: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"line 1: malformed YAML: nesting deeper than 64 levels"):
        cfg.parse_yaml("x: " + "[" * 5000 + "]" * 5000)
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 3000))
    with pytest.raises(ConfigError, match=r"nesting deeper than 64 levels \(through aliases\)"):
        cfg.parse_yaml(chain)
    bomb = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ConfigError, match=r"expands to more than 100,000 values"):
        cfg.parse_yaml(bomb)
    assert len(cfg.parse_yaml("x: " + "[" * 63 + "]" * 63)[0]["x"]) == 1
    looped: dict = {}
    looped["model"] = {"type": "rnn", "x": looped}
    with pytest.raises(ConfigError, match="nesting deeper than 64 levels"):
        cfg.validate(looped)


def test_integers_too_long_for_python_are_refused(tmp_path, corpus_file, capsys):
    path = write_pipeline(tmp_path, corpus_file, "generate: {num_chars: " + "9" * 5000 + "}\n")
    err = run_error(capsys, ["run", str(path)])
    assert "line 5: generate.num_chars: the integer 99999" in err and "5000 digits" in err
    path = write_pipeline(tmp_path, corpus_file)
    err = run_error(capsys, ["run", str(path), "--set", "seed=" + "1" * 5000])
    assert "--set 'seed=111" in err and "5000 digits" in err and len(err) < 300


def test_inf_and_nan_are_refused_where_a_number_is_meant(tiny_config):
    for kind, key in (("optimizer", "lr"), ("corpus", "val_fraction"), ("sampler", "temperature")):
        for bad in (float("inf"), float("-inf"), float("nan")):
            config = {**tiny_config, kind: {**tiny_config[kind], key: bad}}
            with pytest.raises(ConfigError, match=rf"{kind}.{key}: expected a finite number"):
                Pipeline(config)
    config = {
        **tiny_config,
        "corpus": {"type": "url", "url": "http://127.0.0.1:9/x", "timeout": float("inf")},
    }
    with pytest.raises(ConfigError, match=r"corpus.timeout: expected a finite number, got inf"):
        Pipeline(config)


@pytest.mark.parametrize(
    "key",
    [
        "train.checkpoint",
        "train.resume",
        "train.init_from",
        "evaluate.path",
        "generate.checkpoint",
        "corpus.path",
    ],
)
def test_paths_with_a_nul_byte_or_an_overlong_name_fail_before_training(tmp_path, corpus_file, capsys, key):
    path = write_pipeline(tmp_path, corpus_file)
    err = run_error(capsys, ["run", str(path), "--set", f'{key}="{tmp_path}/a\\0b.npz"'])
    assert f"--set {key}: a path cannot contain a NUL byte" in err
    err = run_error(capsys, ["run", str(path), "--set", f"{key}={tmp_path}/{'x' * 300}/m.npz"])
    assert f"--set {key}: the name 'xxxx" in err and "is 300 bytes long; the file system allows 255" in err
    assert not list(tmp_path.glob("m*")), "nothing may be written before the error"


def test_a_checkpoint_name_leaves_room_for_the_files_named_after_it(tmp_path, corpus_file, capsys):
    path = write_pipeline(tmp_path, corpus_file)
    err = run_error(capsys, ["run", str(path), "--set", f"train.checkpoint={tmp_path}/{'x' * 245}.npz"])
    assert "is 249 bytes long; the file system allows 241 (255 less 14" in err
    for folder in (".", "/", "..", "runs/.."):
        err = run_error(capsys, ["run", str(path), "--set", f"train.checkpoint={folder}"])
        assert f"--set train.checkpoint: expected a file path, got the folder '{folder}'" in err
    with pytest.raises(ConfigError, match=r"plugins\[0\]: a path cannot contain a NUL byte"):
        cfg.validate({"plugins": ["a\0b.py"]})
    with pytest.raises(ConfigError, match=r"corpus.glob: a path cannot contain a NUL byte"):
        Pipeline({"corpus": {"type": "files", "glob": "a\0*"}})


def test_files_with_a_non_ascii_separator_and_one_ascii_file(tmp_path, monkeypatch):
    from charrnn_plugins.files import load_files

    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("plain ascii text\n", encoding="utf-8")
    for cache in (False, True):
        corpus = load_files(str(tmp_path / "*.txt"), separator="é\u2014", cache=cache)
        assert "é" not in corpus.vocab and corpus.decode(corpus.ids) == "plain ascii text\n"
    (tmp_path / "b.txt").write_text("more\n", encoding="utf-8")
    corpus = load_files(str(tmp_path / "*.txt"), separator="é")
    assert corpus.decode(corpus.ids) == "plain ascii text\né" + "more\n"


def test_a_finite_timeout_too_long_for_a_socket_is_refused(tiny_config, capsys):
    corpus = {"type": "url", "url": "http://127.0.0.1:9/x.txt", "timeout": 1e23}
    with pytest.raises(ConfigError, match=r"corpus.timeout: must be in \(0, 9223372036\], got 1e\+23"):
        Pipeline({**tiny_config, "corpus": corpus}).data()


def test_integers_beyond_64_bits_are_refused(tiny_config):
    for kind, key in (("train", "sample_length"), ("model", "hidden_size"), ("sampler", "temperature")):
        for bad in (2**63, -(2**63) - 1, 10**23):
            config = {**tiny_config, kind: {**tiny_config[kind], key: bad}}
            with pytest.raises(
                ConfigError, match=rf"{kind}.{key}: -?\d+.* is out of range \(integers fit in 64 bits\)"
            ):
                Pipeline(config)
    config = {**tiny_config, "sampler": {"type": "beam", "beam_width": 10**23}}
    with pytest.raises(ConfigError, match=r"sampler.beam_width: 1000.* is out of range"):
        Pipeline(config)
    assert Pipeline({**tiny_config, "seed": 2**63 - 1}).config["seed"] == 2**63 - 1
