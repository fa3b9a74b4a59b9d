"""Charts: the results as PNG files, one per benchmark, from the same dicts the text tables are rendered from.

Every function takes a benchmark's result as `run` returns it (and `--json` saves it), so charts
can be drawn right after a run or later from saved JSON files (`flight-bench plot`). matplotlib
is an optional extra and is imported only here, only when a chart is drawn; `require` says
what to install before any benchmark runs. Figures use the Agg canvas directly: no pyplot, no
display, no global backend switch.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from benchmarks import report
from benchmarks.historical import short

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'iceberg-feature-flight[plot]'"
DPI = 120
WIDTH_IN = 11.0
FLIGHT = "#4C72B0"  # paths through the Flight server
LOCAL = "#DD8452"  # the same work in process, without Flight
REFERENCE = "#8C8C8C"  # the ceiling or baseline every ratio is relative to
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0}  # readable over the lines
WHISKERS = "bars: median of the timed runs; whiskers: the fastest and the slowest run"


def require() -> None:
    """Fail now, with what to install, if matplotlib is missing: not after minutes of benchmarks."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            f"--plot draws its charts with matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def _figure(height: float) -> Figure:
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _title(figure: Figure, headline: str, machine: dict[str, Any] | None) -> None:
    """The benchmark and its data size; below it, the machine it ran on, when, and the versions that matter."""
    lines = [textwrap.fill(headline, 120)]
    if machine:
        hardware, _, software = report.machine_line(machine).partition("; ")
        when = str(machine.get("time", "?")).replace("T", " ").replace("+00:00", " UTC")
        lines += [f"{hardware}; run {when}", software]
    figure.suptitle("\n".join(lines), fontsize=9.5)


def _tick_rate(value: float, _: object = None) -> str:
    """A rate for an axis tick: `report.rate` without trailing zeros (2.5M, 10M, 0)."""
    text = report.rate(value)
    number, suffix = (text[:-1], text[-1]) if text[-1].isalpha() else (text, "")
    return (number.rstrip("0").rstrip(".") if "." in number else number) + suffix


def _rate_axis(axes: Axes, what: str) -> None:
    from matplotlib.ticker import FuncFormatter

    axes.xaxis.set_major_formatter(FuncFormatter(_tick_rate))
    axes.set_xlabel(f"{what} (higher is better); {WHISKERS}", fontsize=8.5)
    axes.grid(axis="x", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.tick_params(labelsize=8.5)


def _rate_spread(entry: dict[str, Any]) -> tuple[float, float]:
    """The rates of the slowest and the fastest run, from the median's rate and the run times."""
    per_second = entry["rows_per_s"] * entry["median_s"]  # the rows one run moves
    return per_second / entry["max_s"], per_second / entry["min_s"]


def _rate_bars(
    axes: Axes,
    entries: Sequence[dict[str, Any]],
    labels: Sequence[str],
    colors: Sequence[str],
    ratios: Sequence[str],
    reference: float,
    reference_label: str,
) -> None:
    """Horizontal bars of rows/s, top to bottom, with min/max whiskers, a text label each and the reference line."""
    medians = [e["rows_per_s"] for e in entries]
    spreads = [_rate_spread(e) for e in entries]
    lower = [m - lo for m, (lo, _) in zip(medians, spreads, strict=True)]
    upper = [hi - m for m, (_, hi) in zip(medians, spreads, strict=True)]
    positions = list(range(len(entries)))
    axes.barh(
        positions,
        medians,
        color=colors,
        height=0.65,
        xerr=[lower, upper],
        error_kw={"ecolor": "#333333", "elinewidth": 0.9, "capsize": 3},
    )
    axes.set_yticks(positions, [textwrap.fill(label, 42) for label in labels], fontsize=8.5)
    axes.invert_yaxis()  # the first entry on top, as in the text table
    axes.axvline(reference, color="#222222", linestyle="--", linewidth=1)
    axes.annotate(
        reference_label,
        (reference, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -3),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="#222222",
    )
    right = max(hi for _, hi in spreads)
    for position, entry, (_, hi), text in zip(positions, entries, spreads, ratios, strict=True):
        label = f"{report.rate(entry['rows_per_s'])} rows/s"
        if "mb_per_s" in entry:
            label += f", {report.megabytes(entry['mb_per_s'])} MB/s"
        axes.annotate(
            f"{label}  {text}",
            (hi, position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            bbox=LABEL_BOX,
        )
    axes.set_xlim(0, right * 1.5)


def _legend(axes: Axes, entries: Sequence[tuple[str, str]], used: Sequence[str]) -> None:
    """A legend of the colours among `used`, above the top right corner of the axes, clear of bars and labels."""
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=label) for label, color in entries if color in used]
    axes.legend(
        handles=handles,
        fontsize=8,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=len(handles),
        frameon=False,
        borderaxespad=0.2,
    )


def scan(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """rows/s of each read path, against the raw Flight ceiling; the ratio to the ceiling on each bar."""
    keys = list(result["results"])
    entries = [result["results"][k] for k in keys]
    ceiling = result["results"].get("raw_flight_ceiling")
    colors = [REFERENCE if k == "raw_flight_ceiling" else FLIGHT if k.startswith("flight") else LOCAL for k in keys]
    figure = _figure(1.6 + 0.55 * len(entries))
    axes = figure.subplots()
    _rate_bars(
        axes,
        entries,
        [e["label"] for e in entries],
        colors,
        [f"{report.ratio(e['ratio_to_ceiling'])} ceiling" for e in entries],
        ceiling["rows_per_s"] if ceiling else 0.0,
        "ceiling",
    )
    _rate_axis(axes, "rows/s")
    _legend(
        axes, [("raw Flight ceiling", REFERENCE), ("Flight server", FLIGHT), ("in process, no Flight", LOCAL)], colors
    )
    _title(
        figure,
        f"scan: {result['rows']:,} rows x {result['columns']} columns = {result['arrow_mb']:.1f} MB of "
        f"Arrow, a full-table read",
        machine,
    )
    return figure


def _write_case(entry: dict[str, Any]) -> str:
    if entry["method"] == "parquet":
        return "local Parquet file (baseline)"
    writers = entry["writers"]
    return f"Flight, {entry['batch_rows'] // 1024}K-row batches, {writers} writer{'s' if writers > 1 else ''}"


def ingest(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """rows/s of each kind of append, one panel per table shape, against the local Parquet write."""
    shapes = list(dict.fromkeys(r["shape"] for r in result["results"]))
    per_shape = {s: [r for r in result["results"] if r["shape"] == s] for s in shapes}
    figure = _figure(1.6 + sum(0.5 * len(v) + 0.6 for v in per_shape.values()))
    panels = figure.subplots(len(shapes), 1, squeeze=False)[:, 0]
    for axes, shape in zip(panels, shapes, strict=True):
        entries = per_shape[shape]
        baseline = next((e for e in entries if e["method"] == "parquet"), None)
        _rate_bars(
            axes,
            entries,
            [_write_case(e) for e in entries],
            [REFERENCE if e["method"] == "parquet" else FLIGHT for e in entries],
            [f"{report.ratio(e['ratio_to_parquet'])} Parquet" for e in entries],
            baseline["rows_per_s"] if baseline else 0.0,
            "Parquet",
        )
        _rate_axis(axes, "rows/s")
        mb = result["arrow_mb"].get(shape)
        axes.set_title(
            f"{shape} table: {entries[0]['columns']} columns"
            + (f", {mb:.1f} MB of Arrow per write" if mb is not None else ""),
            fontsize=9.5,
            loc="left",
        )
    _title(
        figure,
        f"ingest: {result['rows']:,} rows appended per write to an existing table (default partitioning), "
        "vs a local Parquet write",
        machine,
    )
    return figure


def partitioning(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """Seconds per operation, default layout next to unpartitioned; one panel per operation (scales differ)."""
    from matplotlib.ticker import FuncFormatter

    operations = list(dict.fromkeys(r["operation"] for r in result["results"]))
    figure = _figure(4.6)
    panels = figure.subplots(1, len(operations), squeeze=False)[0]
    for axes, operation in zip(panels, operations, strict=True):
        entries = [r for r in result["results"] if r["operation"] == operation]
        medians = [e["median_s"] for e in entries]
        lower = [e["median_s"] - e["min_s"] for e in entries]
        upper = [e["max_s"] - e["median_s"] for e in entries]
        colors = [REFERENCE if e["layout"] == "unpartitioned" else FLIGHT for e in entries]
        positions = list(range(len(entries)))
        axes.bar(
            positions,
            medians,
            color=colors,
            width=0.6,
            yerr=[lower, upper],
            error_kw={"ecolor": "#333333", "elinewidth": 0.9, "capsize": 4},
        )
        axes.set_xticks(positions, [e["layout"] for e in entries], fontsize=8.5)
        for position, entry in zip(positions, entries, strict=True):
            text = f"{entry['median_s']:.3f} s"
            if entry["layout"] != "unpartitioned":
                text += f"\n{report.ratio(entry['ratio_to_unpartitioned'])} the time"
            axes.annotate(
                text,
                (position, entry["max_s"]),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                bbox=LABEL_BOX,
            )
        axes.set_ylim(0, max(e["max_s"] for e in entries) * 1.3)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.grid(axis="y", color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
        axes.tick_params(labelsize=8.5)
        files = [f"{e['files']} file{'s' if e['files'] != 1 else ''}" for e in entries if "files" in e]
        planned = [f"{e['planned_rows']:,}" for e in entries if "planned_rows" in e]
        detail = (" vs ".join(files) if files else "") + (
            f"rows in planned files: {' vs '.join(planned)}" if planned else ""
        )
        axes.set_title(f"{operation}\n{detail}" if detail else operation, fontsize=9.5)
    panels[0].set_ylabel("seconds (lower is better)", fontsize=8.5)
    figure.supxlabel(f"{WHISKERS}; ratio: time with the default layout / time unpartitioned", fontsize=8.5)
    _title(
        figure,
        f"partitioning: {result['rows']:,} rows; default layout {result['default_layout']} "
        "vs unpartitioned (ratio < 1: the default is faster)",
        machine,
    )
    return figure


def historical(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """Entity rows/s of each way to build the training set, against (a), Flight do_exchange."""
    keys = list(result["results"])
    entries = [result["results"][k] for k in keys]
    exchange = result["results"].get("flight_exchange")
    colors = [FLIGHT if k.startswith("flight") else LOCAL for k in keys]
    figure = _figure(1.6 + 0.6 * len(entries))
    axes = figure.subplots()
    _rate_bars(
        axes,
        entries,
        [e["label"] for e in entries],
        colors,
        [f"{report.ratio(e['ratio_to_exchange'])} (a)" for e in entries],
        exchange["rows_per_s"] if exchange else 0.0,
        "(a)",
    )
    _rate_axis(axes, "entity rows/s")
    _legend(axes, [("Flight server", FLIGHT), ("in process, no Flight", LOCAL)], colors)
    tables = ", ".join(f"{short(t['table'])} {t['rows']:,}" for t in result["tables"])
    _title(
        figure,
        f"historical: point-in-time training set of {result['entity_rows']:,} entity rows x "
        f"{len(result['tables'])} feature tables ({tables} rows; {result['entities']:,} keys), "
        f"{result['features']} features = {result['result_arrow_mb']:.1f} MB of Arrow",
        machine,
    )
    return figure


ONLINE_COLORS = {
    "index": FLIGHT,
    "index_calls": "#64B5CD",
    "floor_stream": "#999999",
    "floor_writing": "#C8C8C8",
    "floor_writing_elsewhere": "#DCDCDC",
    "index_writing": "#55A868",
    "index_writing_elsewhere": "#8172B3",
    "floor": REFERENCE,
    "as_of": "#C44E52",
    "duckdb": LOCAL,
}


def online(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """Latency against batch size, p50 solid and p99 dashed, one colour per path, log-log."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    from benchmarks.online import LABELS

    figure = _figure(5.0)
    axes = figure.subplots()
    for key, by_batch in result["latency"].items():
        batches = [int(b) for b in by_batch]
        color = ONLINE_COLORS.get(key, "#333333")
        axes.plot(batches, [p["p50_ms"] for p in by_batch.values()], color=color, marker="o", label=LABELS[key])
        axes.plot(batches, [p["p99_ms"] for p in by_batch.values()], color=color, marker=".", linestyle="--")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes.set_xlabel("entities per lookup", fontsize=8.5)
    axes.set_ylabel("latency, ms (lower is better)", fontsize=8.5)
    axes.grid(color="#dddddd", linewidth=0.6)
    axes.tick_params(labelsize=8.5)
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="#333333", label="p50"),
        Line2D([], [], color="#333333", linestyle="--", label="p99"),
    ]
    axes.legend(handles=handles, fontsize=8, loc="upper left", frameon=False)
    lags = ", ".join(f"{k.replace('_', ' ')} p50 {v['p50_ms']:.0f} ms" for k, v in result["freshness"].items())
    _title(
        figure,
        f"online: latest {result['features']} features of 1-1000 of {result['entities']:,} entities over Flight "
        f"on loopback; freshness after a put: {lags}",
        machine,
    )
    return figure


COMPACTED = "#55A868"
MOR_TARGET = 0.6  # merge-on-read with 10 % deleted should read at least this fast, relative to copy-on-write


def cow_vs_mor(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """Each layout's speed relative to copy-on-write of the same share, one panel per read."""
    from benchmarks.cow_mor import MEASURES

    entries = list(result["results"].values())
    measures = [m for m in MEASURES if any(m in e["measures"] for e in entries)]
    colors = [
        REFERENCE if e["mode"] == "copy-on-write" else COMPACTED if e["mode"] == "compacted" else FLIGHT
        for e in entries
    ]
    figure = _figure(1.4 + 0.3 * len(entries) * len(measures))
    panels = figure.subplots(len(measures), 1, squeeze=False)[:, 0]
    positions = list(range(len(entries)))
    for axes, key in zip(panels, measures, strict=True):
        # The compacted table's own back-to-back timing against copy-on-write, where the run made one.
        ratios = [
            e["measures"][key].get("paired", {"ratio": e["measures"][key]["ratio_to_cow"]})["ratio"]
            if key in e["measures"]
            else 0.0
            for e in entries
        ]
        axes.barh(positions, ratios, color=colors, height=0.65)
        axes.set_yticks(positions, [e["label"] for e in entries], fontsize=7.5)
        axes.invert_yaxis()
        axes.axvline(1.0, color="#222222", linestyle="--", linewidth=1)
        axes.axvline(MOR_TARGET, color="#C44E52", linestyle=":", linewidth=1)
        for position, entry, ratio in zip(positions, entries, ratios, strict=True):
            m = entry["measures"].get(key)
            if m is None:
                continue
            value = f"{report.rate(m['rows_per_s'])} rows/s" if "rows_per_s" in m else f"{m['median_s']:.3f} s"
            axes.annotate(
                f"{value}  {report.ratio(ratio)}{' paired' if 'paired' in m else ''}",
                (ratio, position),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7.5,
                bbox=LABEL_BOX,
            )
        axes.set_xlim(0, max(max(ratios), 1.0) * 1.45)
        axes.set_title(MEASURES[key], fontsize=9, loc="left")
        axes.grid(axis="x", color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
        axes.tick_params(labelsize=8)
    panels[-1].set_xlabel(
        f"speed relative to copy-on-write with the same rows deleted (higher is better; dotted: the {MOR_TARGET}x "
        "target for merge-on-read)",
        fontsize=8.5,
    )
    _legend(
        panels[0],
        [("copy-on-write", REFERENCE), ("merge-on-read", FLIGHT), ("compacted", COMPACTED)],
        colors,
    )
    _title(
        figure,
        f"cow-vs-mor: {result['rows']:,} rows with 1-30 % deleted, copy-on-write vs merge-on-read in "
        f"{', '.join(map(str, result['delete_files']))} delete files vs compacted",
        machine,
    )
    return figure


HISTORY_COLORS = {"server": FLIGHT, "pyiceberg_fast": LOCAL, "pyiceberg_merge": "#55A868"}


def history(result: dict[str, Any], machine: dict[str, Any] | None = None) -> Figure:
    """p50 latency of one-row appends against the appends before them: the server's puts next to pyiceberg's."""
    from matplotlib.ticker import FuncFormatter

    figure = _figure(5.0)
    axes = figure.subplots()
    for key, entry in result["appends"].items():
        points = entry["curve"]
        axes.plot(
            [p["puts_before"] for p in points],
            [p["p50_ms"] for p in points],
            color=HISTORY_COLORS.get(key, "#333333"),
            marker="o",
            markersize=3,
            label=f"{entry['label']}: last/first {report.ratio(entry['last_to_first'])}",
        )
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_xlabel("appends (snapshots) already in the table", fontsize=8.5)
    axes.set_ylabel("p50 latency of the next appends, ms (lower is better)", fontsize=8.5)
    axes.grid(color="#dddddd", linewidth=0.6)
    axes.tick_params(labelsize=8.5)
    axes.legend(fontsize=8, loc="upper left", frameon=False)
    reads = ", ".join(f"{read} {report.ratio(e['first_ratio'])}" for read, e in result["reads"].items())
    _title(
        figure,
        f"history: {result['puts']:,} one-row appends to one table; goal: last tenth's p50 <= "
        f"{result['goals']['last_to_first']}x the first's; first reads of it against the same rows in one put: {reads}",
        machine,
    )
    return figure


PLOTS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None], Figure]] = {
    "scan": scan,
    "ingest": ingest,
    "partitioning": partitioning,
    "historical": historical,
    "online": online,
    "cow-vs-mor": cow_vs_mor,
    "history": history,
}


def write(payload: dict[str, Any], directory: Path) -> list[Path]:
    """Draw every benchmark of a `--json` payload into `directory` as `<benchmark>.png`; returns the files."""
    require()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in payload["benchmarks"].items():
        if name not in PLOTS:
            report.progress(f"{name}: no chart for this benchmark")
            continue
        path = directory / f"{name}.png"
        PLOTS[name](result, payload.get("machine")).savefig(path)
        written.append(path)
    return written
