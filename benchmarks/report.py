"""Output: aligned plain-text tables for the terminal, JSON for machines, progress lines on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")
MB = 1e6  # throughput is reported in decimal megabytes of Arrow data (`Table.nbytes`)
_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A progress line on stderr, so stdout stays the clean result table."""
    click.echo(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", err=True)


def steps(items: Sequence[T], label: str) -> Iterator[T]:
    """`items`, with a progress bar on stderr when it is a terminal; elsewhere (logs, CI) one line."""
    stream = sys.stderr  # click.get_text_stream is deprecated (removed in Click 9)
    if not stream.isatty():
        progress(f"{label} ({len(items)} steps)")
        yield from items
        return
    with click.progressbar(
        items, label=f"[{time.monotonic() - _STARTED:7.1f}s] {label}", file=stream, show_pos=True, show_eta=True
    ) as bar:
        yield from bar


def rate(value: float) -> str:
    """A throughput with an SI suffix: 1.23M, 456K."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.1f}"


def seconds(value: float) -> str:
    return f"{value:.3f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def megabytes(value: float) -> str:
    return f"{value:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned (labels), the rest right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_line(info: dict[str, Any]) -> str:
    """One line on the machine of a run (`harness.machine()`), for the report and the charts' titles."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "iceberg-feature-flight")
    memory = f"{info['memory_bytes'] / 2**30:.1f} GiB" if info["memory_bytes"] else "? GiB"
    load = f"{info['load_average_1m']:.2f}" if info["load_average_1m"] is not None else "?"
    return (
        f"machine: {info['cpu']}, {info['usable_cores']} cores, {memory}, load average {load}; "
        f"Python {info['python']}, {versions}"
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


TIMING_HEADERS = ("median s", "min s", "max s", "rows/s", "MB/s")


def timing_cells(result: dict[str, Any]) -> list[str]:
    """The cells under `TIMING_HEADERS` for one measured result."""
    return [
        seconds(result["median_s"]),
        seconds(result["min_s"]),
        seconds(result["max_s"]),
        rate(result["rows_per_s"]),
        megabytes(result["mb_per_s"]),
    ]
