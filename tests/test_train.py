"""Training end to end: reproducibility, checkpoints, exact resume, interrupts, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

import charrnn
from charrnn import CheckpointError, ConfigError, generate_text, run_pipeline
from charrnn.cli import main
from charrnn.interrupts import Aborted
from charrnn.pipeline import Pipeline
from conftest import ROOT, TINY_TEXT, FrozenPlugin, charrnn_cmd, params_of


def test_same_seed_same_output(tiny_config, tmp_path):
    a = run_pipeline(tiny_config)
    pa, _ = params_of(tiny_config["train"]["checkpoint"])
    tiny_config["train"]["checkpoint"] = str(tmp_path / "b.npz")
    b = run_pipeline(tiny_config)
    pb, _ = params_of(tiny_config["train"]["checkpoint"])
    assert a.text == b.text and len(a.text) == 4 + 50
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    tiny_config["seed"] = 2
    assert run_pipeline(tiny_config).text != a.text


def test_checkpoint_contents(tiny_config, tmp_path):
    result = run_pipeline(tiny_config)
    arrays, meta = params_of(tiny_config["train"]["checkpoint"])
    assert {"param/Wxh", "param/Whh", "param/Why", "param/bh", "param/by", "state/h"} <= arrays.keys()
    assert any(k.startswith("optim/") for k in arrays)
    assert meta["step"] == 20 and meta["vocab"] == sorted(set(TINY_TEXT))
    # the resolved model section: the YAML's options plus the factory's defaults, as a fresh pipeline resolves it
    assert meta["config"]["model"]["type"] == "rnn" and meta["config"]["model"]["hidden_size"] == 16
    assert meta["config"]["model"] == Pipeline(tiny_config).config["model"]
    assert len(meta["config"]["model"]) > 2  # the defaults are there, not just type and hidden_size
    assert meta["config"]["train"]["steps"] == 20
    assert arrays["param/Wxh"].dtype == np.float32
    assert result.checkpoint == tiny_config["train"]["checkpoint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.best.npz",
        "model.loss.svg",
        "model.metrics.jsonl",
        "model.npz",
        "tiny.txt",
    ]  # no .tmp left behind
    svg = (tmp_path / "model.loss.svg").read_text()  # the picture of the run, redrawn at each report
    assert svg.startswith("<svg") or svg.startswith("<?xml")
    assert "validation" in svg


def test_generate_from_checkpoint_reproduces_run_output(tiny_config):
    text = run_pipeline(tiny_config).text
    assert generate_text(tiny_config["train"]["checkpoint"], num_chars=None, seed_text=None) == text
    other = generate_text(tiny_config["train"]["checkpoint"], num_chars=30, seed_text="a cat")
    assert other.startswith("a cat") and len(other) == 35
    assert generate_text(tiny_config["train"]["checkpoint"], num_chars=0, seed_text="dog") == "dog"


def test_generate_stage_alone_loads_checkpoint(tiny_config, capsys):
    text = run_pipeline(tiny_config).text
    tiny_config["stages"] = ["generate"]
    tiny_config["generate"]["checkpoint"] = tiny_config["train"]["checkpoint"]
    assert run_pipeline(tiny_config).text == text


@pytest.mark.parametrize(
    ("optimizer", "state_key"),
    [({"type": "adagrad"}, "optim/mem.Whh"), ({"type": "adam", "lr": 0.01}, "optim/t")],
)
def test_resume_is_exact(tiny_config, tmp_path, optimizer, state_key):
    tiny_config["optimizer"] = optimizer
    tiny_config["train"].update(steps=30, sample_every=7)
    run_pipeline(tiny_config)
    full, full_meta = params_of(tiny_config["train"]["checkpoint"])
    assert state_key in full
    if state_key == "optim/t":
        assert int(full["optim/t"]) == 30

    tiny_config["train"].update(steps=13, checkpoint=str(tmp_path / "part.npz"))
    run_pipeline(tiny_config)
    tiny_config["train"].update(steps=30, resume=True)
    run_pipeline(tiny_config)
    resumed, meta = params_of(tiny_config["train"]["checkpoint"])
    assert meta["step"] == 30
    assert full.keys() == resumed.keys()
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key
    assert meta["smooth_loss"] == full_meta["smooth_loss"]


def test_resume_errors(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config)
    tiny_config["train"]["resume"] = True
    with pytest.raises(ConfigError, match=r"train.steps \(20\) must be beyond the checkpoint's step \(20\)"):
        run_pipeline(tiny_config)
    tiny_config["train"]["steps"] = 40
    tiny_config["model"]["hidden_size"] = 17
    with pytest.raises(CheckpointError, match="model.hidden_size is 17 but .* trained with 16"):
        run_pipeline(tiny_config)
    tiny_config["model"]["hidden_size"] = 16
    tiny_config["train"]["batch_size"] = 2
    with pytest.raises(CheckpointError, match="train.batch_size is 2 but"):
        run_pipeline(tiny_config)
    tiny_config["train"]["batch_size"] = 4
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.replace("cat", "tac"))
    tiny_config["corpus"]["path"] = str(other)
    with pytest.raises(CheckpointError, match="training text differs"):
        run_pipeline(tiny_config)
    tiny_config["train"]["resume"] = str(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run_pipeline(tiny_config)


def test_fresh_run_overwrites_checkpoint(tiny_config):
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config)
    tiny_config["train"]["steps"] = 5
    run_pipeline(tiny_config)
    assert params_of(tiny_config["train"]["checkpoint"])[1]["step"] == 5


def _write_pipeline(tmp_path, config):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cli_end_to_end_subprocess(tiny_config, tmp_path, cli_env):
    path = _write_pipeline(tmp_path, tiny_config)
    proc = subprocess.run(
        charrnn_cmd("run", str(path), "--set", "generate.num_chars=77"),
        capture_output=True,
        env=cli_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode("utf-8")
    assert out.startswith("the ") and len(out) == 4 + 77 + 1
    err = proc.stderr.decode()
    assert "step 10/20" in err and "nats/char" in err and "bits/char" in err and "val " in err
    assert "chars/s" in err
    gen = subprocess.run(
        charrnn_cmd("generate", tiny_config["train"]["checkpoint"], "--num-chars", "77"),
        capture_output=True,
        env=cli_env,
        timeout=60,
    )
    assert gen.returncode == 0 and gen.stdout == proc.stdout
    version = subprocess.run(charrnn_cmd("--version"), capture_output=True, env=cli_env, timeout=60)
    assert version.stdout.decode().startswith("charrnn ")


def test_generated_text_is_utf8_whatever_the_locale(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "u.txt"
    corpus.write_text("ça va? ñandú! über 😀 " * 40, encoding="utf-8")
    config = {
        "corpus": {"type": "text", "path": str(corpus)},
        "model": {"type": "rnn", "hidden_size": 8},
        "train": {
            "steps": 3,
            "batch_size": 2,
            "seq_length": 5,
            "sample_every": None,
            "checkpoint": str(tmp_path / "u.npz"),
        },
        "generate": {"num_chars": 30, "seed_text": "ç😀"},
    }
    path = _write_pipeline(tmp_path, config)
    proc = subprocess.run(
        charrnn_cmd("run", str(path)),
        capture_output=True,
        timeout=120,
        env={
            **__import__("os").environ,
            "LC_ALL": "C",
            "LANG": "C",
            "PYTHONIOENCODING": "ascii",
            "CHARRNN_LOAD_PLUGINS": "",
        },
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode("utf-8")
    assert text.startswith("ç😀") and len(text) == 2 + 30 + 1


def _wait_for(path, proc, polls=1200):
    for _ in range(polls):  # up to a minute
        if path.exists():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("checkpoint never appeared")


@pytest.mark.slow
def test_sigint_saves_then_generates_and_resume_matches(tiny_config, tmp_path, cli_env):
    ckpt = tmp_path / "int.npz"
    tiny_config["train"].update(steps=None, sample_every=None, save_every=200, checkpoint=str(ckpt))
    path = _write_pipeline(tmp_path, tiny_config)
    proc = subprocess.Popen(
        charrnn_cmd("run", str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env
    )
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"interrupted" in err
    assert out.decode().startswith("the ") and len(out.decode()) == 4 + 50 + 1  # the generate stage still ran
    arrays, meta = params_of(ckpt)
    k = meta["step"]
    assert k >= 200

    # resuming from step k gives the same parameters as an uninterrupted run to the same step
    tiny_config["train"].update(steps=k + 25, save_every=None)
    tiny_config["stages"] = ["train"]
    tiny_config["train"]["resume"] = True
    run_pipeline(tiny_config)
    resumed, _ = params_of(ckpt)
    tiny_config["train"].update(resume=False, checkpoint=str(tmp_path / "straight.npz"))
    run_pipeline(tiny_config)
    straight, _ = params_of(tmp_path / "straight.npz")
    for key in straight:
        assert np.array_equal(straight[key], resumed[key]), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "code"), [((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)]
)
def test_second_interrupt_or_sigterm_saves_and_exits(tiny_config, tmp_path, cli_env, signals, code):
    ckpt = tmp_path / "int.npz"
    tiny_config["train"].update(steps=None, sample_every=None, save_every=100, checkpoint=str(ckpt))
    tiny_config["generate"]["num_chars"] = 10**8  # a long generate stage, for the second Ctrl+C to land in
    path = _write_pipeline(tmp_path, tiny_config)
    proc = subprocess.Popen(
        charrnn_cmd("run", str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env
    )
    _wait_for(ckpt, proc)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    assert out == b""
    _, meta = params_of(ckpt)
    assert meta["step"] >= 100
    assert not (tmp_path / "int.npz.tmp").exists()


def test_second_ctrl_c_during_training_saves_and_aborts(tiny_config):
    class DoubleCtrlC:
        @charrnn.hookimpl
        def charrnn_train_report(self, step, metrics):
            if step == 10:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    tiny_config["train"].update(steps=1000, sample_every=5)
    with pytest.raises(Aborted) as info:
        run_pipeline(tiny_config, plugins=[DoubleCtrlC()])
    assert info.value.code == 130
    assert params_of(tiny_config["train"]["checkpoint"])[1]["step"] == 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_classic_config_writes_final_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text((ROOT / "data" / "input.txt").read_text()[:5000])
    code = main(
        [
            "run",
            str(ROOT / "configs" / "classic.yaml"),
            "--set",
            "train.steps=120",
            "--set",
            "generate.num_chars=40",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "final_model.npz").exists()
    assert "step 100" in err and len(out) == len("The ") + 40 + 1


def test_best_checkpoint_metrics_and_eval_every(tiny_config, tmp_path):
    tiny_config["train"].update(steps=30, sample_every=10, eval_every=5)
    result = run_pipeline(tiny_config)
    lines = (tmp_path / "model.metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all(r["val_loss"] is not None and r["lr"] == 0.1 and r["chars_per_sec"] > 0 for r in records)
    best = min(records, key=lambda r: r["val_loss"])
    arrays, meta = params_of(tmp_path / "model.best.npz")
    assert meta["step"] == best["step"] and meta["best_val_loss"] == best["val_loss"]
    assert result.train.best_val_loss == best["val_loss"]
    # the best checkpoint holds the model as it was at that step: its val loss evaluates to the same
    from charrnn.evaluation import EVAL_STREAMS, evaluate
    from charrnn.pipeline import Pipeline

    pipe = Pipeline(tiny_config)
    model = pipe.load(str(tmp_path / "model.best.npz")).model
    val_ids = pipe.data().val_ids
    assert evaluate(model, val_ids, EVAL_STREAMS, 8) == pytest.approx(best["val_loss"], rel=1e-6)
    # a second (fresh) run starts the metrics file anew
    tiny_config["train"]["steps"] = 10
    run_pipeline(tiny_config)
    lines = (tmp_path / "model.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10]


def test_evaluation_does_not_disturb_training(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=30, sample_every=None, eval_every=3)
    run_pipeline(tiny_config)
    with_eval, _ = params_of(tiny_config["train"]["checkpoint"])
    tiny_config["train"].update(eval_every=None, checkpoint=str(tmp_path / "noeval.npz"))
    tiny_config["corpus"]["val_fraction"] = 0.1
    run_pipeline(tiny_config)
    without, _ = params_of(tmp_path / "noeval.npz")
    assert all(np.array_equal(with_eval[k], without[k]) for k in with_eval)


def test_early_stopping(tiny_config):
    tiny_config["optimizer"] = {"type": "frozen"}
    tiny_config["train"].update(steps=500, sample_every=None, eval_every=2, patience=3)
    result = run_pipeline(tiny_config, plugins=[FrozenPlugin()])  # the val loss cannot improve
    # evaluations at steps 2 (best), 4, 6, 8: three without improvement, so it stops at step 8
    assert result.train.stopped_early and result.train.steps == 8
    assert len(result.text) == 4 + 50  # the later stages still run


def test_no_files_beside_the_checkpoint_when_turned_off(tiny_config, tmp_path):
    tiny_config["train"].update(keep_best=False, metrics=False, plot=False)
    run_pipeline(tiny_config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt") == ["model.npz"]


def test_the_loss_picture_without_a_metrics_file_draws_this_run(tiny_config, tmp_path):
    tiny_config["train"].update(metrics=False, sample_every=5)
    run_pipeline(tiny_config)
    svg = (tmp_path / "model.loss.svg").read_text()
    assert "<title>Training loss: model</title>" in svg and svg.count("<path") == 2  # train and val


def test_init_from_fine_tunes_from_a_checkpoint(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config)
    base, _ = params_of(tiny_config["train"]["checkpoint"])
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.replace("cat", "tac").replace("dog", "god"))  # same characters, new text
    tiny_config["corpus"]["path"] = str(other)
    tiny_config["train"].update(
        init_from=tiny_config["train"]["checkpoint"], checkpoint=str(tmp_path / "ft.npz"), steps=1
    )
    tiny_config["optimizer"]["lr"] = 1e-30  # one negligible step: the weights are the base model's
    run_pipeline(tiny_config)
    tuned, meta = params_of(tmp_path / "ft.npz")
    assert meta["step"] == 1
    assert all(np.allclose(tuned[k], base[k]) for k in base if k.startswith("param/"))

    tiny_config["train"]["init_from"] = str(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_pipeline(tiny_config)
    other.write_text(TINY_TEXT + "XYZ")
    tiny_config["train"]["init_from"] = str(tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match=r"vocabulary of .* differs.*new: 'XYZ'"):
        run_pipeline(tiny_config)
    tiny_config["train"]["resume"] = True
    with pytest.raises(ConfigError, match="exclude each other"):
        run_pipeline(tiny_config)


def test_evaluate_stage_prints_loss_and_baselines(tiny_config, tmp_path, capsys):
    import yaml

    tiny_config["stages"] = ["train", "evaluate"]
    tiny_config["train"]["steps"] = 100
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("evaluation on validation split")
    losses = {line.split("  ")[0].strip(): float(line.split()[-4]) for line in out[1:]}
    assert set(losses) == {"model", "unigram baseline", "bigram baseline"}
    assert losses["model"] < losses["bigram baseline"] < losses["unigram baseline"]
    # on another text, from the checkpoint alone
    text = tmp_path / "eval.txt"
    text.write_text("the cat sat on the log. " * 10)
    assert main(["run", str(path), "--set", "stages=[evaluate]", "--set", f"evaluate.path={text}"]) == 0
    assert capsys.readouterr().out.startswith(f"evaluation on {text}")


def test_ngram_baselines_by_hand():
    from charrnn.evaluation import ngram_baselines

    train = np.array([0, 1, 0, 1, 0])  # counts 3, 2 -> add-one 4/7, 3/7
    uni, bi = ngram_baselines(train, np.array([0, 1]), 2)
    assert uni == pytest.approx(-(np.log(4 / 7) + np.log(3 / 7)) / 2)
    # pairs 0->1 twice, 1->0 twice; add-one: P(1|0) = 3/4
    assert bi == pytest.approx(-np.log(3 / 4))


def test_train_then_evaluate_loads_the_corpus_once(tiny_config):
    calls = []

    class Counted:
        @charrnn.hookimpl
        def charrnn_corpus_loader(self, register):
            def load(repeat: int = 8):
                calls.append(repeat)
                return charrnn.Corpus.from_text(TINY_TEXT)

            register("counted", load)

    tiny_config["corpus"] = {"type": "counted", "val_fraction": 0.1}
    tiny_config["stages"] = ["train", "evaluate"]
    result = run_pipeline(tiny_config, plugins=[Counted()])
    assert calls == [8] and result.evaluation["loss"] > 0


@pytest.mark.slow
def test_sigusr1_stops_after_the_step_and_saves(tiny_config, tmp_path, cli_env):
    """Open MPI's mpiexec forwards SIGUSR1 (it kills jobs on SIGINT): it means what a first Ctrl+C means."""
    ckpt = tmp_path / "usr1.npz"
    tiny_config["train"].update(steps=None, sample_every=None, save_every=50, checkpoint=str(ckpt))
    tiny_config["stages"] = ["train"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    proc = subprocess.Popen(
        charrnn_cmd("run", str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env
    )
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _, meta = params_of(ckpt)
    assert f"stopped at step {meta['step']}; saved {ckpt}".encode() in err
    assert b"Traceback" not in err
