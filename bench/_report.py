"""The benchmark suite's report: one results dict in, JSON + markdown + PNG plots out.

``write_report(results, out_dir)`` writes ``<name>.json`` (the figures, NaN as
null), ``<name>.md`` (what a person reads: targets first, then failures, then one
section per scenario) and ``<name>-<scenario id>.png`` for each scenario that
measured several concurrencies. The markdown links the plots by relative name,
so the folder can be moved or committed as is.

matplotlib is imported only to draw, with the Agg canvas (no display, no
network, only the fonts matplotlib ships): without it the JSON and markdown are
still written and the markdown says the plots are missing.

Re-render a report from its JSON (handy when tuning the format)::

    python bench/_report.py bench/results/2026-11-23.json /tmp/report
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

#: The PNG's size: 12 x 4.5 inches at 100 dpi is 1200 x 450 pixels.
PLOT_INCHES = (12.0, 4.5)
PLOT_DPI = 100

#: Stream figures a point's ``extra`` may hold; a scenario shows them when any point has one.
GAP_KEYS = ("gap_p50_ms", "gap_p90_ms", "gap_p99_ms")

_MISSING = "-"


# ---------------------------------------------------------------------------
# Numbers.


def _number(x: Any) -> float | None:
    """``x`` as a finite float, or None for None, NaN, infinities and non-numbers."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt_sig(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits without exponent; whole numbers keep every digit.

    1446.3 -> "1446", 300.2 -> "300", 42.17 -> "42.2", 0.85 -> "0.850" (digits=3).
    """
    v = _number(x)
    if v is None:
        return _MISSING
    if v == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{v:.{decimals}f}"
    # Rounding can carry into a new digit (9.996 -> "10.00"): one decimal too many then.
    if decimals and len(text.lstrip("-").replace(".", "").lstrip("0")) > digits:
        text = f"{v:.{decimals - 1}f}"
    return text


def fmt_throughput(x: Any) -> str:
    """Throughput: 3 significant digits, whole numbers in full (1223, 300, 42.2, 0.512)."""
    return fmt_sig(x, 3)


def fmt_ms(x: Any) -> str:
    """Milliseconds: 1 decimal, or 2 significant digits under 1 ms (3.2, 0.41, 0.035)."""
    v = _number(x)
    if v is None:
        return _MISSING
    if 0 < abs(v) < 1:
        return fmt_sig(v, 2)
    return f"{v:.1f}"


def fmt_ratio(x: Any) -> str:
    """A ratio: 2 decimals (0.85, 1.37)."""
    v = _number(x)
    return _MISSING if v is None else f"{v:.2f}"


def fmt_cell(x: Any) -> str:
    """Any table cell: floats by ``fmt_throughput``, None/NaN as a dash, text escaped."""
    if x is None:
        return _MISSING
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return fmt_throughput(x)
    if isinstance(x, list | tuple):
        return ", ".join(fmt_cell(v) for v in x)
    return _escape(str(x))


def _escape(text: str) -> str:
    """Text safe inside a markdown table cell: no pipes, no line breaks."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _duration(seconds: Any) -> str:
    v = _number(seconds)
    if v is None:
        return _MISSING
    if v < 60:
        return f"{v:.1f} s"
    minutes, secs = divmod(round(v), 60)
    return f"{minutes} min {secs} s"


def json_safe(data: Any) -> Any:
    """``data`` with every NaN and infinity replaced by None (JSON null), keys kept in order."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


# ---------------------------------------------------------------------------
# Markdown.


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines; cells are already formatted text."""
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def file_stem(name: str) -> str:
    """A name made safe for a file name and a markdown link (no spaces, slashes, brackets)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "report"


def plot_file(results: dict[str, Any], scenario: dict[str, Any]) -> str:
    """The plot's file name, relative to the markdown next to it."""
    return f"{file_stem(str(results.get('name', 'report')))}-{file_stem(str(scenario['id']))}.png"


def wants_plot(scenario: dict[str, Any]) -> bool:
    """Whether a scenario gets a plot: ``plot`` is true and a series has 2+ concurrencies."""
    if not scenario.get("plot"):
        return False
    return any(len(_concurrencies([series])) >= 2 for series in scenario.get("series", []))


def _concurrencies(series: Iterable[dict[str, Any]]) -> list[float]:
    found = {
        p["concurrency"]
        for s in series
        for p in s.get("points", [])
        if _number(p.get("concurrency")) is not None and p["concurrency"] > 0
    }
    return sorted(found)


def _header(results: dict[str, Any]) -> list[str]:
    lines = [f"# {results.get('title', 'Benchmarks')}: {results.get('name', '')}", ""]
    m = results.get("machine") or {}
    facts = [str(m["cpu"])] if m.get("cpu") else []
    if m.get("cpus") is not None:
        facts.append(f"{m['cpus']} CPUs")
    if _number(m.get("memory_gib")) is not None:
        facts.append(f"{m['memory_gib']:.1f} GiB")
    if m.get("os"):
        facts.append(str(m["os"]))
    if m.get("load_before"):
        facts.append("load before " + " / ".join(fmt_ratio(x) for x in m["load_before"]))
    if facts:
        lines.append("**Machine:** " + ", ".join(facts) + "  ")
    if m.get("dispatch"):
        # The CPU code path torch and MKL run on: results rounded on one path may differ
        # in the last bits on another (docs/adr/0015-batch-invariance.md).
        lines.append(f"**Dispatch path (servers' default):** {m['dispatch']}  ")
    versions = results.get("versions") or {}
    if versions:
        lines.append("**Versions:** " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  ")
    run = [f"`{results['command']}`"] if results.get("command") else []
    run.append(f"wall time {_duration(results.get('wall_s'))}")
    if _number(results.get("setup_s")):
        run.append(f"set-up before it {_duration(results['setup_s'])}")
    if results.get("started"):
        run.append(f"started {results['started']}")
    if results.get("quick"):
        run.append("**quick mode** (short runs: figures are rough)")
    lines += ["**Command:** " + " · ".join(run) + "  ", "**Outcome:** " + _outcome(results), ""]
    return lines


def _outcome(results: dict[str, Any]) -> str:
    """One line: how many failures and unmet targets, so a reader knows before scrolling."""
    targets = [t for s in results.get("scenarios", []) for t in s.get("targets", [])]
    unmet = sum(t.get("met") is False for t in targets)
    failures = len(results.get("failures") or [])
    parts = [f"**{failures} failure{'s' if failures != 1 else ''}**" if failures else "no failures"]
    if targets:
        met = f"{unmet} of {len(targets)} targets not met"
        parts.append(f"**{met}**" if unmet else f"all {len(targets)} targets met")
    return ", ".join(parts)


def _targets(results: dict[str, Any]) -> list[str]:
    rows = []
    for scenario in results.get("scenarios", []):
        for t in scenario.get("targets", []):
            met = t.get("met")
            rows.append(
                [
                    _escape(str(scenario.get("title", scenario.get("id", "")))),
                    _escape(str(t.get("name", ""))),
                    _escape(str(t.get("target", ""))),
                    _target_value(t.get("value")),
                    "met" if met is True else "**not met**" if met is False else _MISSING,
                    fmt_cell(t.get("detail", "")),
                ]
            )
    if not rows:
        return []
    header = ["scenario", "target", "required", "value", "met", "detail"]
    return ["## Targets", "", *md_table(header, rows), ""]


def _target_value(value: Any) -> str:
    """A target's measured value: 3 significant digits, or as given when not a number."""
    if value is None or _number(value) is not None or isinstance(value, float):
        return fmt_sig(value, 3)
    return fmt_cell(value)


def _failures(results: dict[str, Any]) -> list[str]:
    failures = results.get("failures") or []
    if not failures:
        return []
    lines = [f"## Failures ({len(failures)})", ""]
    lines += [f"- **{_escape(str(f))}**" for f in failures]
    return [*lines, ""]


def _settings(settings: dict[str, Any]) -> list[str]:
    if not settings:
        return []
    parts = []
    for key, value in settings.items():
        if isinstance(value, list | tuple):
            text = ",".join(fmt_cell(v) for v in value)
        else:
            text = value if isinstance(value, str) else fmt_cell(value)
        parts.append(f"`{key}={text}`")
    return ["**Settings:** " + " ".join(parts), ""]


def _points(scenario: dict[str, Any]) -> list[str]:
    entries = [
        (series, point)
        for series in scenario.get("series", [])
        for point in series.get("points", [])
    ]
    if not entries:
        return []
    units = {str(p.get("unit", "")) for _, p in entries}
    one_unit = units.pop() if len(units) == 1 else None
    gaps = any(key in (p.get("extra") or {}) for _, p in entries for key in GAP_KEYS)
    header = ["series", "generator", "concurrency"]
    header.append(f"throughput ({one_unit})" if one_unit else "throughput")
    header += ["p50 ms", "p90 ms", "p99 ms", "ok", "failed"]
    if gaps:
        header += ["gap p50 ms", "gap p90 ms", "gap p99 ms"]
    rows = []
    for series, p in entries:
        throughput = fmt_throughput(p.get("throughput"))
        if not one_unit and p.get("unit") and throughput != _MISSING:
            throughput += f" {p['unit']}"
        failed = p.get("failed")
        row = [
            _escape(str(series.get("label") or p.get("label", ""))),
            _escape(str(p.get("generator") or series.get("generator", ""))),
            fmt_cell(p.get("concurrency")),
            throughput,
            fmt_ms(p.get("p50_ms")),
            fmt_ms(p.get("p90_ms")),
            fmt_ms(p.get("p99_ms")),
            fmt_cell(p.get("ok")),
            f"**{failed}**" if isinstance(failed, int) and failed > 0 else fmt_cell(failed),
        ]
        if gaps:
            extra = p.get("extra") or {}
            row += [fmt_ms(extra.get(key)) for key in GAP_KEYS]
        rows.append(row)
    return [*md_table(header, rows), ""]


def _scenario(scenario: dict[str, Any], plots: dict[str, str]) -> list[str]:
    title = str(scenario.get("title", scenario.get("id", "")))
    lines = [f"## {title}", ""]
    if scenario.get("description"):
        lines += [str(scenario["description"]).strip(), ""]
    lines += _settings(scenario.get("settings") or {})
    lines += _points(scenario)
    for table in scenario.get("tables", []):
        lines += [f"### {table.get('title', '')}", ""]
        rows = [[fmt_cell(c) for c in row] for row in table.get("rows", [])]
        lines += [*md_table([str(h) for h in table.get("header", [])], rows), ""]
    if scenario.get("id") in plots:
        lines += [f"![{title}]({plots[scenario['id']]})", ""]
    elif wants_plot(scenario):
        lines += ["_No plot: matplotlib was not available to draw it._", ""]
    notes = scenario.get("notes") or []
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    return lines


def render_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The report as markdown.

    Args:
        results: the suite's results dict (NaN or None for figures not measured).
        plots: scenario id -> the plot's file name relative to the markdown.

    Returns:
        Header (machine, versions, command), every target, the failures, then one
        section per scenario: description, settings, points, tables, plot, notes.
    """
    lines = _header(results) + _targets(results) + _failures(results)
    for scenario in results.get("scenarios", []):
        lines += _scenario(scenario, plots)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots.


def _xy(points: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(concurrency, value) pairs sorted by concurrency; a missing value stays NaN (a gap)."""
    pairs = sorted(
        (float(p["concurrency"]), v if (v := _number(p.get(key))) is not None else math.nan)
        for p in points
        if _number(p.get("concurrency")) is not None and p["concurrency"] > 0
    )
    return [c for c, _ in pairs], [v for _, v in pairs]


def draw_plot(scenario: dict[str, Any], path: Path) -> None:
    """Throughput and latency against concurrency, side by side, as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        NullFormatter,
        NullLocator,
    )

    # Figure + the Agg canvas directly, not pyplot: no global state, no backend to pick.
    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(str(scenario.get("title", scenario.get("id", ""))), fontsize=13)
    left, right = fig.subplots(1, 2)
    series = scenario.get("series", [])
    colours = [f"C{i % 10}" for i in range(len(series))]
    ticks = _concurrencies(series)
    units: list[str] = []
    latencies: list[float] = []
    throughputs: list[float] = []
    styles: tuple[tuple[str, Literal["-", "--", ":"], str], ...] = (
        ("p50_ms", "-", "p50"),
        ("p90_ms", "--", "p90"),
        ("p99_ms", ":", "p99"),
    )
    for colour, s in zip(colours, series, strict=True):
        points = s.get("points", [])
        for p in points:
            if p.get("unit") and p["unit"] not in units:
                units.append(str(p["unit"]))
        x, y = _xy(points, "throughput")
        throughputs += [v for v in y if not math.isnan(v)]
        left.plot(x, y, marker="o", color=colour, label=str(s.get("label", "")))
        for key, style, _ in styles:
            x, y = _xy(points, key)
            y = [v if v > 0 else math.nan for v in y]  # a log axis cannot show 0
            latencies += [v for v in y if not math.isnan(v)]
            right.plot(x, y, linestyle=style, marker=".", color=colour)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{c:g}" for c in ticks])
        # The same x range on both panels, even where a series has no figure at an end.
        ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
    left.set_ylim(bottom=0)
    left.set_ylabel(f"throughput ({', '.join(units)})" if units else "throughput")
    left.set_title("throughput", fontsize=11)
    left.legend(fontsize=9, loc="best")
    right.set_ylabel("latency (ms)")
    right.set_title("latency p50 / p90 / p99", fontsize=11)
    if latencies:
        right.set_yscale("log")
        # Plain numbers (0.5, 2, 20), not powers of ten; 1-2-5 steps while they stay few.
        decades = math.log10(max(latencies) / min(latencies))
        right.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if decades < 3 else (1,)))
        right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        right.yaxis.set_minor_formatter(NullFormatter())
    else:
        _no_data(right, "no latency figures")
    if not throughputs:
        _no_data(left, "no throughput figures")
    # Colours are the series of the left panel; this legend only says which line is which.
    handles = [Line2D([], [], color="0.3", linestyle=st, label=lab) for _, st, lab in styles]
    handles += [
        Line2D([], [], color=c, label=str(s.get("label", "")))
        for c, s in zip(colours, series, strict=True)
    ]
    right.legend(handles=handles, fontsize=9, loc="best", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI, format="png")


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5")


# ---------------------------------------------------------------------------
# Files.


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and the plots into ``out_dir``.

    Returns:
        The paths written: ``"json"``, ``"md"``, and ``"plot:<scenario id>"`` per plot.
        Without matplotlib there are no plots, and the markdown says so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(str(results.get("name", "report")))
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    for scenario in results.get("scenarios", []):
        if not wants_plot(scenario):
            continue
        path = out_dir / plot_file(results, scenario)
        try:
            draw_plot(scenario, path)
        except ImportError:
            break
        plots[scenario["id"]] = path.name
        written[f"plot:{scenario['id']}"] = path
    json_path = out_dir / f"{stem}.json"
    # allow_nan=False: a NaN that json_safe missed fails here, not in a reader's parser.
    text = json.dumps(json_safe(results), indent=2, allow_nan=False, default=str)
    json_path.write_text(text + "\n", encoding="utf-8")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(render_markdown(results, plots), encoding="utf-8")
    return {"json": json_path, "md": md_path, **written}


def main(argv: list[str] | None = None) -> int:
    """``python bench/_report.py RESULTS.json OUT_DIR``: render a report again from its JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results JSON written by the suite")
    parser.add_argument("out_dir", type=Path, help="folder for the .json, .md and .png files")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    for kind, path in write_report(results, args.out_dir).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
