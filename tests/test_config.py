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
    with pytest.raises(ConfigError, match="model.hidden_size: expected int, got 'big'"):
        Pipeline(tiny_config)
