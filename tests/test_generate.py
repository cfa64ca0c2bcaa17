"""Generation: batched samples, stop strings, streaming, and the sampler's optional methods."""

from __future__ import annotations

import numpy as np
import pytest

import charrnn
from charrnn.cli import main
from charrnn.generate import generate
from charrnn.pipeline import Pipeline, generate_samples


@pytest.fixture
def trained(tiny_config):
    tiny_config["stages"] = ["train"]
    tiny_config["train"]["steps"] = 60
    charrnn.run_pipeline(tiny_config)
    return tiny_config["train"]["checkpoint"]


@pytest.fixture
def loaded(tiny_config, trained):
    loaded = Pipeline(tiny_config).load(trained)
    return loaded.model, loaded.vocab


class Recorder:
    """Greedy, recording what the loop tells it."""

    def __init__(self):
        self.calls = []

    def reset(self, k):
        self.calls.append(("reset", k))

    def observe(self, ids):
        self.calls.append(("observe", ids.tolist()))

    def __call__(self, logits, rng):
        return logits.argmax(-1)


def test_num_samples_are_independent_batched_streams(loaded):
    model, vocab = loaded
    sampler = charrnn.Pipeline({"sampler": {"type": "temperature"}}).sampler(vocab.vocab)
    texts = generate(model, sampler, vocab, np.random.default_rng(0), "the ", 40, num_samples=5)
    assert len(texts) == 5 and all(t.startswith("the ") and len(t) == 44 for t in texts)
    assert len(set(texts)) > 1
    again = generate(model, sampler, vocab, np.random.default_rng(0), "the ", 40, num_samples=5)
    assert again == texts


def test_one_stream_batched_equals_unbatched_for_greedy(loaded):
    model, vocab = loaded
    one = generate(model, Recorder(), vocab, np.random.default_rng(0), "a cat", 30)
    many = generate(model, Recorder(), vocab, np.random.default_rng(0), "a cat", 30, num_samples=3)
    assert many == one * 3


def test_observe_sees_seed_and_generated_ids_and_reset_sees_k(loaded):
    model, vocab = loaded
    rec = Recorder()
    texts = generate(model, rec, vocab, np.random.default_rng(0), "dog", 4, num_samples=2)
    assert rec.calls[0] == ("reset", 2)
    observed = [ids for name, ids in rec.calls[1:]]
    assert [vocab.vocab[i[0]] for i in observed[:3]] == ["d", "o", "g"]
    assert "".join(vocab.vocab[i[0]] for i in observed[3:]) == texts[0][3:]
    assert all(len(i) == 2 for i in observed)


def test_search_takes_over_generation(loaded):
    model, vocab = loaded
    seen = {}

    class AlwaysFirst:
        def __call__(self, logits, rng):
            raise AssertionError("search samplers are not called per step")

        def search(self, model, state, last_ids, num_chars, rng):
            seen.update(k=len(last_ids), last=vocab.vocab[last_ids[0]], h=state["h"].shape)
            return np.zeros((len(last_ids), num_chars), dtype=np.int64)

    texts = generate(model, AlwaysFirst(), vocab, np.random.default_rng(0), "the", 7, num_samples=2)
    assert texts == ["the" + vocab.vocab[0] * 7] * 2
    assert seen == {"k": 2, "last": "e", "h": (2, 16)}


def test_stop_strings_cut_before_the_first_match(loaded):
    model, vocab = loaded
    full = generate(model, Recorder(), vocab, np.random.default_rng(0), "the ", 300)[0]
    generated = full[4:]
    stop = generated[50:53]
    first = generated.find(stop)
    cut = generate(model, Recorder(), vocab, np.random.default_rng(0), "the ", 300, stop=[stop, "ZZZ"])[0]
    assert cut == "the " + generated[:first]
    assert generate(model, Recorder(), vocab, np.random.default_rng(0), "the ", 300, stop=["ZZZ"])[0] == full


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_streaming_hands_over_the_same_text_in_chunks(loaded, chunk):
    model, vocab = loaded
    parts = []
    text = generate(
        model,
        Recorder(),
        vocab,
        np.random.default_rng(0),
        "the ",
        100,
        on_text=parts.append,
        chunk_chars=chunk,
    )[0]
    assert "".join(parts) == text and parts[0] == "the "
    assert len(parts) <= 2 + -(-100 // chunk)
    if chunk == 7:
        assert len(parts) > 10  # really streamed, not handed over at the end


def test_streaming_with_stop_strings(loaded):
    model, vocab = loaded
    full = generate(model, Recorder(), vocab, np.random.default_rng(0), "the ", 300)[0]
    stop = full[4 + 120 : 4 + 124]
    parts = []
    text = generate(
        model,
        Recorder(),
        vocab,
        np.random.default_rng(0),
        "the ",
        300,
        stop=[stop],
        on_text=parts.append,
        chunk_chars=16,
    )[0]
    assert "".join(parts) == text == "the " + full[4:][: full[4:].find(stop)]


def test_byte_vocabulary_decodes_split_characters(tmp_path):
    raw = np.frombuffer("ñandú über ça ".encode() * 20, dtype=np.uint8)
    corpus = charrnn.Corpus(raw.copy(), [chr(i) for i in range(256)], "", "bytes")
    assert corpus.encode("ñ").tolist() == [0xC3, 0xB1]

    class Replay:  # emits the bytes of a fixed text, one per step
        def __init__(self, data):
            self.data, self.i = data, 0

        def __call__(self, logits, rng):
            self.i += 1
            return np.array([self.data[self.i - 1]])

    class Dummy:
        params = {}

        def init_state(self, k):
            return {"h": np.zeros((k, 1))}

        def step(self, ids, state):
            return np.zeros((len(ids), 256)), state

    data = "héllo wörld ✓".encode()
    parts = []
    text = generate(
        Dummy(),
        Replay(data),
        corpus,
        np.random.default_rng(0),
        "",
        len(data),
        on_text=parts.append,
        chunk_chars=1,
    )[0]
    assert text == "héllo wörld ✓" and "".join(parts) == text


def test_generate_samples_api_and_cli_flags(trained, capsys):
    result = generate_samples(trained, num_chars=20, seed_text="the ", num_samples=3)
    assert len(result.texts) == 3 and result.text == "\n---\n".join(result.texts)
    assert main(["generate", trained, "--num-chars", "20", "--seed-text", "the ", "--num-samples", "3"]) == 0
    assert capsys.readouterr().out == result.text + "\n"
    assert main(["generate", trained, "--num-chars", "200", "--stream", "--num-samples", "2"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", trained, "--num-chars", "200", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == streamed
    assert main(["generate", trained, "--num-chars", "200", "--stop", "e", "--seed-text", "y"]) == 0
    out = capsys.readouterr().out
    assert "e" not in out[1:]
    assert main(["generate", trained, "-o", "temperature=0.0001", "--num-chars", "30"]) == 0
    greedy = generate_samples(trained, num_chars=30, sampler_options={"temperature": 0.0001}).text
    assert capsys.readouterr().out == greedy + "\n"
    assert main(["generate", trained, "-o", "temprature=2"]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err
    assert main(["generate", trained, "--num-samples", "0"]) == 2


def test_pipeline_generate_options(tiny_config, capsys, tmp_path):
    import yaml

    tiny_config["generate"].update(num_samples=2, stream=True, separator="\n===\n", stop="zzz")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    first, second = out[:-1].split("\n===\n")
    assert first.startswith("the ") and len(first) == 54 and len(second) == 54


@pytest.mark.parametrize(
    "returned",
    [np.int64(1), [[1]], np.array([0.5]), "a", np.array([10**6]), np.array([-1]), np.array([1, 2])],
)
def test_a_sampler_returning_no_id_array_is_a_plugin_failure(loaded, returned):
    model, vocab = loaded

    def bad(logits, rng):
        return returned

    with pytest.raises(
        charrnn.PluginFailure, match=r"sampler 'bad' failed: returned .*expected integer ids in \[0, \d+\)"
    ):
        generate(model, bad, vocab, np.random.default_rng(0), "the ", 5)
