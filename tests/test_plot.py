from __future__ import annotations

import builtins
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest

from charrnn import plot
from charrnn.cli import main
from charrnn.errors import CharrnnError
from charrnn.plot import Series, nice_ticks, read_metrics, render_svg, run_labels, write_loss_svg
from conftest import IN_CI

SVG = "{http://www.w3.org/2000/svg}"


def records(n=5, start=0, every=100, val_every=2):
    return [
        {
            "step": start + (i + 1) * every,
            "train_loss": 4.0 - 0.3 * i,
            "val_loss": 4.1 - 0.3 * i if i % val_every == 0 else None,
            "lr": 0.002,
            "chars_per_sec": 1000.0,
            "time": 1.7e9 + i,
        }
        for i in range(n)
    ]


def write_jsonl(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def parse(path):
    return ET.parse(path).getroot()


def paths_of(root):
    """The drawn lines: <path> elements inside the clipped plot group, with their attributes."""
    group = root.find(f"{SVG}g[@clip-path]")
    return [p.attrib for p in group.iter(f"{SVG}path")]


def texts(root):
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def path_points(d):
    return [tuple(map(float, part.strip().split())) for part in d[1:].split(" L")]


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1500) == [0, 250, 500, 750, 1000, 1250, 1500]
    assert nice_ticks(1.37, 4.21) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    ticks = nice_ticks(2.001, 2.0043)
    assert ticks[0] <= 2.001 and ticks[-1] >= 2.0043 and 4 <= len(ticks) <= 10
    steps = {round(b - a, 12) for a, b in zip(ticks[:-1], ticks[1:], strict=True)}
    assert len(steps) == 1
    mantissa = steps.pop() / 10 ** math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9)
    assert round(mantissa, 9) in (1, 2, 2.5, 5)
    one = nice_ticks(3.0, 3.0)  # a single value still gets an axis around it
    assert one[0] < 3.0 < one[-1]


def test_svg_is_valid_xml_with_axes_grid_legend_and_styles(tmp_path):
    a = write_jsonl(tmp_path / "runs" / "small" / "final_model.metrics.jsonl", records(6))
    b = write_jsonl(tmp_path / "runs" / "big" / "final_model.metrics.jsonl", records(4, every=250))
    out = write_loss_svg([a, b], tmp_path / "loss.svg", title="two runs")
    root = parse(out)
    assert root.tag == f"{SVG}svg"
    words = texts(root)
    assert "two runs" in words and "step" in words and "loss (nats/char)" in words
    # legend: a colour per run (same-named files told apart by their folders) and a line-style key
    assert {"small/final_model", "big/final_model", "train", "validation"} <= set(words)
    assert "1,000" in words  # x ticks: round values up to the last step (1000)
    lines = paths_of(root)
    assert len(lines) == 4  # train and validation per run (validation has 2+ points in each)
    train_a, val_a, train_b, val_b = lines
    assert "stroke-dasharray" not in train_a and "stroke-dasharray" in val_a
    assert train_a["stroke"] == val_a["stroke"] != train_b["stroke"] == val_b["stroke"]
    keys = root.findall(f"{SVG}g/{SVG}line")  # legend swatches, in the order of the entries
    assert [k.get("stroke") for k in keys[:2]] == [train_a["stroke"], train_b["stroke"]]
    assert "stroke-dasharray" not in keys[2].attrib and "stroke-dasharray" in keys[3].attrib
    assert len(path_points(train_a["d"])) == 6 and len(path_points(val_a["d"])) == 3


def test_lines_map_steps_and_losses_onto_the_axes(tmp_path):
    out = write_loss_svg(records(3, val_every=99), tmp_path / "one.svg")
    root = parse(out)
    (train,) = paths_of(root)
    (x0, y0), (x1, y1), (x2, y2) = path_points(train["d"])
    assert x0 < x1 < x2 and y0 < y1 < y2  # later steps to the right, falling loss downward
    assert x2 - x1 == pytest.approx(x1 - x0, abs=0.2)  # equal step gaps, equal distances
    assert y2 - y1 == pytest.approx(y1 - y0, abs=0.2)
    assert "train" in texts(root)


def test_missing_values_break_the_line_and_a_lone_point_is_a_dot():
    s = Series("val", [1, 2, 3, 4, 5], [3.0, 2.9, None, float("nan"), 2.5], "#000000")
    root = ET.fromstring(render_svg([s]))
    group = root.find(f"{SVG}g[@clip-path]")
    assert len(path_points(paths_of(root)[0]["d"])) == 2
    assert len(group.findall(f"{SVG}circle")) == 1


def test_numpy_steps_and_values_are_drawn():
    import numpy as np

    s = Series("x", np.arange(1, 6) * 100, np.linspace(3.0, 2.0, 5, dtype=np.float32))
    (line,) = paths_of(ET.fromstring(render_svg([s])))
    assert len(path_points(line["d"])) == 5


def test_end_marker_draws_a_cross_at_the_last_point():
    plain = Series("trial 1", [1, 2, 3], [3.0, 2.5, 2.2])
    cut = Series("trial 2", [1, 2], [3.1, 2.9], end_marker=True, opacity=0.6)
    root = ET.fromstring(render_svg([plain, cut]))
    lines = paths_of(root)
    assert len(lines) == 3  # two curves and the cross
    (last_x, last_y) = path_points(lines[1]["d"])[-1]
    cross = lines[2]["d"]
    x_left, y_top = map(float, cross[1:].split(" L")[0].split())
    assert (x_left + 4, y_top + 4) == pytest.approx((last_x, last_y), abs=0.11)
    assert lines[1]["opacity"] == "0.6" and lines[0]["stroke"] != lines[1]["stroke"]


def test_text_is_escaped(tmp_path):
    nasty = 'a<b>&"c"\x01'
    out = write_loss_svg([records(3), records(4)], tmp_path / "x.svg", labels=[nasty, "ok"], title=nasty)
    words = texts(parse(out))  # parses: escaped, and the control character XML cannot hold is replaced
    assert words.count('a<b>&"c"\ufffd') == 2  # the title and the run's legend entry


def test_resumed_run_shows_the_continuation():
    rec = records(5) + [{"step": 300, "train_loss": 1.0, "val_loss": None}]
    train, val = plot.loss_series(rec)
    assert list(train.steps) == [100, 200, 300] and train.values[-1] == 1.0
    assert list(val.steps) == [100]  # the replaced run's value at step 300 is gone with it


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    out = tmp_path / "loss.svg"
    out.write_text("old picture")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot.os, "replace", failing_replace)
    with pytest.raises(CharrnnError, match="cannot write .*loss.svg: No space left"):
        write_loss_svg(records(3), out)
    assert out.read_text() == "old picture" and os.listdir(tmp_path) == ["loss.svg"]
    monkeypatch.setattr(plot.os, "replace", real_replace)
    write_loss_svg(records(3), out)
    assert out.read_text().startswith("<svg") and os.listdir(tmp_path) == ["loss.svg"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file (a private temp file is not)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n{"step": 3}\n', ":2: not a JSON line"),
        ('{"step": 1, "train_loss": 2.0}\n\n[1, 2]\n', ":3: expected a JSON object"),
        ('{"train_loss": 2.0}\n', ":1: 'step' must be a number >= 0, got None"),
        ('{"step": true, "train_loss": 2.0}\n', ":1: 'step' must be a number"),
        ('{"step": 5, "val_loss": "2.1"}\n', ":1: 'val_loss' must be a number or null, got '2.1'"),
        ("", ": no metrics records"),
        ("\n\n", ": no metrics records"),
    ],
)
def test_malformed_metrics_name_file_and_line(tmp_path, capsys, content, problem):
    path = tmp_path / "bad.metrics.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CharrnnError) as err:
        read_metrics(path)
    assert f"{path}{problem}" in str(err.value)
    assert main(["plot", str(path), "-o", str(tmp_path / "out.svg")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and problem in stderr
    assert not (tmp_path / "out.svg").exists()


def test_unreadable_metrics_are_one_line_errors(tmp_path, capsys):
    binary = tmp_path / "model.npz"
    binary.write_bytes(b"PK\x03\x04\xff\xfe")
    cases = {
        str(tmp_path / "missing.jsonl"): "metrics file not found",
        str(tmp_path): "is a directory",
        str(binary): "not UTF-8",
    }
    for path, message in cases.items():
        assert main(["plot", path, "-o", str(tmp_path / "o.svg")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_metrics_without_any_loss_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "train_loss": None, "val_loss": None}])
    with pytest.raises(CharrnnError, match="no loss values"):
        write_loss_svg(path, tmp_path / "o.svg")


def test_cli_default_output_beside_the_metrics(tmp_path, capsys):
    metrics = write_jsonl(tmp_path / "run" / "final_model.metrics.jsonl", records(4))
    assert main(["plot", str(metrics)]) == 0
    out = tmp_path / "run" / "final_model.loss.svg"
    assert capsys.readouterr().out == f"{out}\n"
    words = texts(parse(out))
    assert "Training loss: final_model" in words and {"train", "validation"} <= set(words)


def test_cli_overlays_runs_and_sets_title(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.metrics.jsonl", records(4))
    b = write_jsonl(tmp_path / "b.metrics.jsonl", records(6))
    out = tmp_path / "pics" / "both.svg"
    assert main(["plot", str(a), str(b), "-o", str(out), "--title", "a vs b"]) == 0
    root = parse(out)
    assert "a vs b" in texts(root) and {"a", "b", "train", "validation"} <= set(texts(root))
    assert len({p["stroke"] for p in paths_of(root)}) == 2


def test_cli_rejects_other_output_formats(tmp_path, capsys):
    metrics = write_jsonl(tmp_path / "m.jsonl", records(3))
    assert main(["plot", str(metrics), "-o", str(tmp_path / "loss.pdf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plot output must end in .svg or .png") and err.count("\n") == 1


def test_png_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    metrics = write_jsonl(tmp_path / "m.jsonl", records(3))
    assert main(["plot", str(metrics), "-o", str(tmp_path / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {plot.PLOT_EXTRA}\n" and "charrnn[plot]" in err
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.slow
def test_png_with_matplotlib(tmp_path):
    if not IN_CI:
        pytest.importorskip("matplotlib")  # in CI the extra is installed, so a missing one fails
    a = write_jsonl(tmp_path / "a.metrics.jsonl", records(5))
    b = write_jsonl(tmp_path / "b.metrics.jsonl", records(3))
    out = plot.write_loss_plot([a, b], tmp_path / "loss.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["a.metrics.jsonl", "b.metrics.jsonl", "loss.png"]


def test_run_labels_are_short_and_distinct():
    assert run_labels(["x/a.metrics.jsonl", "x/b.metrics.jsonl"]) == ["a", "b"]
    assert run_labels(["r/lr1/final_model.metrics.jsonl", "r/lr2/final_model.metrics.jsonl"]) == [
        "lr1/final_model",
        "lr2/final_model",
    ]
    assert run_labels(["m.jsonl", "m.jsonl"]) == ["m.jsonl", "m.jsonl"]


def test_legend_that_does_not_fit_says_how_many_more():
    many = [Series(f"trial {i}", [1, 2], [3.0, 2.0 + i / 100]) for i in range(40)]
    words = texts(ET.fromstring(render_svg(many)))
    shown = [w for w in words if w.startswith("trial ")]
    assert 5 < len(shown) < 40 and f"and {40 - len(shown)} more" in words


def test_training_history_is_drawn_as_svg_whatever_the_name(tmp_path):
    out = write_loss_svg(records(4), tmp_path / "run.loss.png")  # write_loss_svg never needs matplotlib
    assert parse(out).tag == f"{SVG}svg"


def test_long_history_is_thinned_to_the_pixels_but_keeps_its_spikes():
    n = 20_000
    values = [2.0 + (i % 7) / 100 for i in range(n)]
    values[12_345] = 5.0  # one spike must survive the thinning
    root = ET.fromstring(render_svg([Series("train", list(range(n)), values)]))
    (line,) = paths_of(root)
    points = path_points(line["d"])
    assert len(points) < 4 * 800  # at most four per pixel column
    xs = [x for x, _ in points]
    assert xs == sorted(xs)
    top = min(y for _, y in points)
    spike = [x for x, y in points if y == top]
    assert len(spike) == 1 and spike[0] == pytest.approx(xs[0] + (xs[-1] - xs[0]) * 12_345 / (n - 1), abs=1)
    assert max(y for _, y in points) - top > 100  # the spike reaches well above the rest
