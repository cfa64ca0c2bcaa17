"""Loss curves as pictures: SVG with no dependency, PNG through the optional matplotlib.

Everything draws a list of `Series` (label, steps, values, style), so each caller is thin: `charrnn plot`
reads metrics files, training redraws its in-memory history at each report, and a sweep can draw one
validation curve per trial with `end_marker=True` on the ones stopped early.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from charrnn.errors import CharrnnError
from charrnn.files import RunFiles, atomic_write
from charrnn.metrics import is_number, read_metrics

# matplotlib's tab10: distinct, colour-blind tolerant, and the same colours in the SVG and the PNG
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
Y_LABEL = "loss (nats/char)"
KEY_COLOR = "#555555"  # legend entries that name a line style, not a run
PLOT_EXTRA = "PNG output needs matplotlib: pip install 'charrnn[plot]' (or write .svg, which needs nothing)"

Records = Sequence[Mapping[str, Any]]
Run = str | os.PathLike | Records


@dataclass(frozen=True)
class Series:
    """One line. `values[i]` is None (or not finite) where there is no point: the line breaks there."""

    label: str
    steps: Sequence[float]
    values: Sequence[float | None]
    color: str | None = None  # None: the next colour of the palette
    dashed: bool = False
    width: float = 2.0
    opacity: float = 1.0
    end_marker: bool = False  # a cross on the last point: "this run was cut short"

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.values):
            raise ValueError(f"series {self.label!r}: {len(self.steps)} steps but {len(self.values)} values")

    def segments(self) -> list[list[tuple[float, float]]]:
        """The drawable points, split where a value is missing or not finite."""
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(self.steps, self.values, strict=True):
            if _finite(x) and _finite(y):
                segments[-1].append((x, y))
            elif segments[-1]:
                segments.append([])
        return [seg for seg in segments if seg]


def loss_series(
    records: Iterable[Mapping[str, Any]], label: str = "", color: str | None = None
) -> list[Series]:
    """Train (solid) and validation (dashed) loss of one run, in one colour, each line joining its points.

    A resumed run appends to the same file from its checkpoint's step: a record whose step does not
    exceed the previous one replaces the records from that step on, so the picture shows the run as
    it continued.
    """
    kept: list[Mapping[str, Any]] = []
    for record in records:
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    prefix = f"{label} " if label else ""
    series = []
    for key, name, dashed in (("train_loss", "train", False), ("val_loss", "validation", True)):
        points = [(r["step"], r[key]) for r in kept if _finite(r.get(key))]  # validation runs less often
        if points:
            steps, values = zip(*points, strict=True)
            series.append(Series(f"{prefix}{name}", steps, values, color, dashed=dashed))
    return series


def run_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short, distinct labels: the file stems, with as many parent folders as it takes to tell them apart."""
    parts = [Path(p).parent.parts + (RunFiles.from_metrics(p).name,) for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def default_output(path: str | os.PathLike) -> Path:
    """Where `charrnn plot` writes without -o: `<run>.loss.svg` beside the (first) metrics file."""
    return RunFiles.from_metrics(path).plot


def write_loss_plot(
    runs: Run | Sequence[Run],
    out_path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    fmt: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Draw the loss curves of one run or several, atomically; `fmt` (default: the suffix) is svg or png.

    `runs` is a metrics file, a list of records (training passes its in-memory history), or a
    sequence of either. Labels default to the files' names; a single in-memory run has none.
    `warn` hears about a file's unfinished last line (a run still writing it), which is left out.
    """
    series, legend, default_title = _loss_plot(runs, labels, warn)
    write_plot(series, out_path, title=default_title if title is None else title, legend=legend, fmt=fmt)
    return Path(out_path)


def write_loss_svg(
    runs: Run | Sequence[Run],
    out_path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """`write_loss_plot` as SVG whatever the suffix: what training calls at each report (no dependency)."""
    return write_loss_plot(runs, out_path, labels=labels, title=title, fmt="svg")


def _loss_plot(
    runs: Run | Sequence[Run], labels: Sequence[str] | None, warn: Callable[[str], None] | None = None
) -> tuple[list[Series], list[Series] | None, str]:
    """The series, the legend (one run: per line; several: a colour per run and a line-style key), a title."""
    if isinstance(runs, (str, os.PathLike)) or (
        isinstance(runs, Sequence) and runs and isinstance(runs[0], Mapping)
    ):
        runs = [runs]  # type: ignore[list-item]
    runs = list(runs)  # type: ignore[arg-type]
    if not runs:
        raise CharrnnError("nothing to plot: no metrics given")
    if labels is None:
        paths = [r for r in runs if isinstance(r, (str, os.PathLike))]
        names = iter(run_labels(paths))
        labels = [next(names) if isinstance(r, (str, os.PathLike)) else "" for r in runs]
        if len(runs) > 1:
            labels = [label or f"run {i + 1}" for i, label in enumerate(labels)]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    series, legend = [], []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        records = read_metrics(run, warn=warn) if isinstance(run, (str, os.PathLike)) else run
        color = PALETTE[i % len(PALETTE)]
        series += loss_series(records, label if len(runs) > 1 else "", color)
        legend.append(Series(label, [], [], color))
    if not series:
        raise CharrnnError("nothing to plot: the metrics hold no loss values")
    if len(runs) == 1:
        return series, None, f"Training loss: {labels[0]}" if labels[0] else "Training loss"
    key = [Series("train", [], [], KEY_COLOR), Series("validation", [], [], KEY_COLOR, dashed=True)]
    return series, legend + key, f"Training loss, {len(runs)} runs"


def write_plot(
    series: Sequence[Series],
    out_path: str | os.PathLike,
    *,
    title: str = "",
    x_label: str = "step",
    y_label: str = Y_LABEL,
    legend: Sequence[Series] | None = None,
    fmt: str | None = None,
) -> None:
    """Write `series` as SVG (no dependency) or PNG (matplotlib), atomically; `fmt` defaults to the suffix.

    The legend lists the labelled series unless `legend` gives its own entries (series without points).
    """
    out = Path(out_path)
    suffix = f".{fmt}" if fmt else out.suffix.lower()
    if suffix == ".svg":
        svg = render_svg(series, title=title, x_label=x_label, y_label=y_label, legend=legend)
        _write_atomic(out, lambda f: f.write(svg.encode("utf-8")))
    elif suffix == ".png":
        _write_png(series, out, title=title, x_label=x_label, y_label=y_label, legend=legend)
    else:
        raise CharrnnError(f"plot output must end in .svg or .png, got {str(out)!r}")


def _write_atomic(path: Path, write: Any) -> None:
    """Readers (a browser refreshing the picture mid-training) see the old file or the new, never half."""
    with atomic_write(path, "picture", CharrnnError) as f:
        write(f)


# ---- SVG ----

WIDTH, HEIGHT = 860, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 20, 46, 48
LEGEND_ROW, LEGEND_LABEL_CHARS = 20, 28


def render_svg(
    series: Sequence[Series],
    *,
    title: str = "",
    x_label: str = "step",
    y_label: str = Y_LABEL,
    width: int = WIDTH,
    height: int = HEIGHT,
    legend: Sequence[Series] | None = None,
) -> str:
    """The SVG document: axes with round ticks, grid, one path per series, a legend on the right."""
    colors = _colors(series)
    entries = (
        [(s, c) for s, c in zip(series, colors, strict=True) if s.label]
        if legend is None
        else [(s, s.color or KEY_COLOR) for s in legend if s.label]
    )
    labels = [_shorten(s.label) for s, _ in entries]
    legend_w = 0 if not any(labels) else 40 + int(6.6 * max(len(lb) for lb in labels))
    left, top = MARGIN_LEFT, MARGIN_TOP if title else 20
    right, bottom = width - MARGIN_RIGHT - legend_w, height - MARGIN_BOTTOM
    drawn = [s.segments() for s in series]
    points = [p for segments in drawn for seg in segments for p in seg]
    if not points:
        raise CharrnnError("nothing to plot: no finite values")
    x_ticks = nice_ticks(min(0.0, min(p[0] for p in points)), max(p[0] for p in points))
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))

    def sx(x: float) -> float:
        return left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_esc(FONT)}" font-size="12">',
        f"<title>{_esc(title or 'loss')}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<clipPath id="plot-area"><rect x="{left}" y="{top - 2}" width="{right - left}" '
        f'height="{bottom - top + 4}"/></clipPath>',
    ]
    if title:
        out.append(
            f'<text x="{(left + right) / 2:.1f}" y="{top - 18}" text-anchor="middle" font-size="15" '
            f'font-weight="600" fill="#222">{_esc(title)}</text>'
        )
    xfmt, yfmt = _tick_format(x_ticks), _tick_format(y_ticks)
    for x in x_ticks:
        px = f"{sx(x):.1f}"
        out.append(f'<line x1="{px}" y1="{top}" x2="{px}" y2="{bottom}" stroke="#e6e6e6"/>')
        out.append(f'<line x1="{px}" y1="{bottom}" x2="{px}" y2="{bottom + 5}" stroke="#555"/>')
        out.append(f'<text x="{px}" y="{bottom + 18}" text-anchor="middle" fill="#444">{xfmt(x)}</text>')
    for y in y_ticks:
        py = f"{sy(y):.1f}"
        out.append(f'<line x1="{left}" y1="{py}" x2="{right}" y2="{py}" stroke="#e6e6e6"/>')
        out.append(f'<line x1="{left - 5}" y1="{py}" x2="{left}" y2="{py}" stroke="#555"/>')
        out.append(
            f'<text x="{left - 8}" y="{py}" dy="0.32em" text-anchor="end" fill="#444">{yfmt(y)}</text>'
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#555"/>'
    )
    out.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 10}" text-anchor="middle" fill="#222">'
        f"{_esc(x_label)}</text>"
    )
    out.append(
        f'<text transform="translate(16 {(top + bottom) / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'fill="#222">{_esc(y_label)}</text>'
    )
    out.append('<g clip-path="url(#plot-area)" fill="none" stroke-linejoin="round" stroke-linecap="round">')
    for s, segments, color in zip(series, drawn, colors, strict=True):
        out.extend(_series_svg(s, segments, color, sx, sy))
    out.append("</g>")
    if legend_w:
        out.extend(_legend_svg(entries, labels, right + 14, top, bottom))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _series_svg(s: Series, data: list[list[tuple[float, float]]], color: str, sx: Any, sy: Any) -> list[str]:
    segments = [_thin([(sx(x), sy(y)) for x, y in seg]) for seg in data]
    style = f'stroke="{_esc(color)}" stroke-width="{s.width:g}"'
    if s.dashed:
        style += f' stroke-dasharray="{3 * s.width:g} {2 * s.width:g}"'
    if s.opacity < 1:
        style += f' opacity="{s.opacity:g}"'
    parts = []
    for seg in segments:
        if len(seg) == 1:  # a lone point would be an invisible path
            parts.append(
                f'<circle cx="{seg[0][0]:.1f}" cy="{seg[0][1]:.1f}" r="{s.width + 1:g}" fill="{_esc(color)}"/>'
            )
        else:
            d = "M" + " L".join(f"{x:.1f} {y:.1f}" for x, y in seg)
            parts.append(f'<path d="{d}" {style}/>')
    if s.end_marker and segments:
        (x, y), r = segments[-1][-1], 4
        parts.append(
            f'<path d="M{x - r:.1f} {y - r:.1f} L{x + r:.1f} {y + r:.1f} M{x - r:.1f} {y + r:.1f} '
            f'L{x + r:.1f} {y - r:.1f}" stroke="{_esc(color)}" stroke-width="2"/>'
        )
    return parts


def _thin(seg: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Keep the first, lowest, highest and last point of each pixel column: the same picture, bounded size.

    A long run's history has far more points than the plot has pixels; without this, each report's
    redraw and the file would grow with the run.
    """
    if len(seg) < 4 * (seg[-1][0] - seg[0][0] + 1):
        return seg
    out: list[tuple[float, float]] = []
    for _, group in itertools.groupby(seg, key=lambda p: int(p[0])):
        column = list(group)
        ys = [y for _, y in column]
        keep = {0, len(column) - 1, ys.index(min(ys)), ys.index(max(ys))}
        out += [column[i] for i in sorted(keep)]
    return out


def _legend_svg(
    entries: Sequence[tuple[Series, str]], labels: Sequence[str], x: float, top: float, bottom: float
) -> list[str]:
    rows = [(s, label, color) for (s, color), label in zip(entries, labels, strict=True)]
    fits = max(1, int((bottom - top) // LEGEND_ROW))
    hidden = 0
    if len(rows) > fits:
        rows, hidden = rows[: fits - 1], len(rows) - (fits - 1)
    out = ['<g font-size="12" fill="#222">']
    for i, (s, label, color) in enumerate(rows):
        y = top + 10 + i * LEGEND_ROW
        dash = f' stroke-dasharray="{3 * s.width:g} {2 * s.width:g}"' if s.dashed else ""
        out.append(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 26:.1f}" y2="{y:.1f}" stroke="{_esc(color)}" '
            f'stroke-width="{s.width:g}"{dash}/>'
        )
        out.append(f'<text x="{x + 32:.1f}" y="{y:.1f}" dy="0.32em">{_esc(label)}</text>')
    if hidden:
        out.append(
            f'<text x="{x:.1f}" y="{top + 10 + len(rows) * LEGEND_ROW:.1f}" dy="0.32em" fill="#666">'
            f"and {hidden} more</text>"
        )
    out.append("</g>")
    return out


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) that cover [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-12 * max(1.0, abs(hi)):  # one value: a small band around it
        pad = abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _tick_format(ticks: Sequence[float]) -> Any:
    exponent = Decimal(repr(ticks[1] - ticks[0])).normalize().as_tuple().exponent
    decimals = max(0, -int(exponent))  # as many as the step needs: 0.25 -> 2, 0.5 -> 1, 500 -> 0
    if decimals == 0:
        return lambda v: f"{v:,.0f}"
    return lambda v: f"{v:.{decimals}f}"


def _colors(series: Sequence[Series]) -> list[str]:
    auto = iter(PALETTE * (1 + len(series) // len(PALETTE)))
    return [s.color or next(auto) for s in series]


def _shorten(label: str) -> str:
    return label if len(label) <= LEGEND_LABEL_CHARS else "\u2026" + label[-(LEGEND_LABEL_CHARS - 1) :]


_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _esc(text: str) -> str:
    """Text or attribute value: escaped, and without the characters XML 1.0 cannot hold at all."""
    text = _NOT_XML.sub("\ufffd", str(text))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


# ---- PNG ----


def _write_png(
    series: Sequence[Series],
    out: Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    legend: Sequence[Series] | None,
) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise CharrnnError(PLOT_EXTRA) from None
    fig = Figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s, color in zip(series, _colors(series), strict=True):
        segments = s.segments()
        xs = [p[0] for seg in segments for p in [*seg, (math.nan, math.nan)]]  # NaN breaks the line
        ys = [p[1] for seg in segments for p in [*seg, (math.nan, math.nan)]]
        style = {"color": color, "linewidth": s.width * 0.75, "alpha": s.opacity}
        ax.plot(xs, ys, linestyle="--" if s.dashed else "-", label=s.label or None, **style)
        for seg in segments:
            if len(seg) == 1:
                ax.plot(*seg[0], marker="o", **style)
        if s.end_marker and segments:
            ax.plot(*segments[-1][-1], marker="x", markersize=7, markeredgewidth=2, **style)
    if all(x >= 0 for s in series for x in s.steps):
        ax.set_xlim(left=0)  # as the SVG: the axis starts where training starts
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, color="#e6e6e6")
    ax.set_axisbelow(True)
    if legend is not None:
        handles = [
            Line2D([], [], color=s.color or KEY_COLOR, linestyle="--" if s.dashed else "-", label=s.label)
            for s in legend
            if s.label
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    elif any(s.label for s in series):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _write_atomic(out, lambda f: fig.savefig(f, format="png"))
