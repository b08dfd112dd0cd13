"""The benchmarks' one report writer: a results dict in, JSON + markdown + PNG plots out.

``<name>.md`` gives issue #18's targets side by side first, then every target, then the
failures, then per scenario its description, settings, points, tables, plot and notes,
then the servers' warnings;
``<name>.json`` the figures (NaN as null); ``<name>-<scenario>.png`` the scenarios that
measured several concurrencies (when matplotlib is installed). ``python
bench/_report.py RESULTS.json OUT_DIR`` renders a report again from its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The PNG's size: 12 x 4.5 inches at 100 dpi is 1200 x 450 pixels.
PLOT_INCHES = (12.0, 4.5)
PLOT_DPI = 100
#: Stream figures a point's ``extra`` may hold; a scenario shows them when any point has one.
GAP_KEYS = ("gap_p50_ms", "gap_p90_ms", "gap_p99_ms")
LATENCIES = (("p50_ms", "-", "p50"), ("p90_ms", "--", "p90"), ("p99_ms", ":", "p99"))
_MISSING = "-"


def _number(x: Any) -> float | None:
    """``x`` as a finite float, or None for None, NaN, infinities and non-numbers."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt_sig(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits without exponent; whole numbers keep every
    digit: 1446.3 -> "1446", 42.17 -> "42.2", 0.85 -> "0.850"."""
    if (v := _number(x)) is None:
        return _MISSING
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
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
    return _MISSING if v is None else fmt_sig(v, 2) if 0 < abs(v) < 1 else f"{v:.1f}"


def fmt_ratio(x: Any) -> str:
    """A ratio: 2 decimals (0.85, 1.37)."""
    return _MISSING if (v := _number(x)) is None else f"{v:.2f}"


def fmt_cell(x: Any) -> str:
    """Any table cell: floats by ``fmt_throughput``, None/NaN as a dash, text escaped."""
    if x is None or isinstance(x, float):
        return fmt_throughput(x)
    return _escape(str(x))


def _escape(text: str) -> str:
    """Text safe inside a markdown table cell: no pipes, no line breaks."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _duration(seconds: Any) -> str:
    if (v := _number(seconds)) is None:
        return _MISSING
    return f"{v:.1f} s" if v < 60 else "{} min {} s".format(*divmod(round(v), 60))


def json_safe(data: Any) -> Any:
    """``data`` with every NaN and infinity replaced by None (JSON null), keys kept in order."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


# Markdown ----------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines; cells are already formatted text."""
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def file_stem(name: str) -> str:
    """A name made safe for a file name and a markdown link (no spaces, slashes, brackets)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "report"


def wants_plot(scenario: dict[str, Any]) -> bool:
    """Whether a scenario gets a plot: ``plot`` is true and a series has 2+ concurrencies."""
    series = scenario.get("series", [])
    return bool(scenario.get("plot")) and any(len(_concurrencies([s])) >= 2 for s in series)


def _concurrencies(series: Iterable[dict[str, Any]]) -> list[float]:
    points = (p for s in series for p in s.get("points", []))
    return sorted({p["concurrency"] for p in points if (_number(p.get("concurrency")) or 0) > 0})


def _header(results: dict[str, Any]) -> list[str]:
    m = results.get("machine") or {}
    facts = [str(m["cpu"])] if m.get("cpu") else []
    facts += [f"{m['cpus']} CPUs"] if m.get("cpus") is not None else []
    facts += [f"{m['memory_gib']:.1f} GiB"] if _number(m.get("memory_gib")) is not None else []
    facts += [str(m["os"])] if m.get("os") else []
    if m.get("load_before"):
        facts.append("load before " + " / ".join(fmt_ratio(x) for x in m["load_before"]))
    lines = [f"# {results.get('title', 'Benchmarks')}: {results.get('name', '')}", ""]
    lines += ["**Machine:** " + ", ".join(facts) + "  "] if facts else []
    if m.get("dispatch"):
        # The CPU code path torch and MKL run on: results rounded on one path may differ
        # in the last bits on another (docs/adr/0015-batch-invariance.md).
        lines.append(f"**Dispatch path (servers' default):** {m['dispatch']}  ")
    if versions := results.get("versions") or {}:
        lines.append("**Versions:** " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  ")
    run = [f"`{results['command']}`"] if results.get("command") else []
    run.append(f"wall time {_duration(results.get('wall_s'))}")
    if _number(results.get("setup_s")):
        run.append(f"set-up before it {_duration(results['setup_s'])}")
    if results.get("started"):
        run.append(f"started {results['started']}")
    if results.get("quick"):
        run.append("**quick mode** (short runs: figures are rough)")
    lines += ["**Command:** " + " · ".join(run) + "  "]
    return [*lines, f"**Outcome:** {_outcome(results)}", ""]


def _outcome(results: dict[str, Any]) -> str:
    """One line: how many failures and unmet targets, so a reader knows before scrolling."""
    # A figure reported, not judged (met None), is not a target here.
    targets = [t for s in results.get("scenarios", []) for t in s.get("targets", [])
               if t.get("met") is not None]  # fmt: skip
    unmet = sum(t.get("met") is False for t in targets)
    failures = len(results.get("failures") or [])
    parts = [f"**{failures} failure{'s' if failures != 1 else ''}**" if failures else "no failures"]
    if targets:
        parts.append(f"**{unmet} of {len(targets)} targets not met**" if unmet
                     else f"all {len(targets)} targets met")  # fmt: skip
    return ", ".join(parts)


#: The issue whose targets the report lists first, side by side, on one screen, in the
#: issue's order of their scenarios (others after them).
SUMMARY_ISSUE = 18
SUMMARY_ORDER = ("echo", "peers", "limit", "streams", "gateway", "workers")


def _target_cells(t: dict[str, Any]) -> tuple[str, str]:
    """A target's value and whether it is met, as table cells ("reported": not judged)."""
    met = {True: "met", False: "**not met**"}.get(t.get("met"), _MISSING)
    if t.get("met") is None and t.get("target") == "reported":
        met = "reported"
    value = t.get("value")
    shown = fmt_sig(value) if value is None or isinstance(value, int | float) else value
    return fmt_cell(shown), met


def _summary(results: dict[str, Any]) -> list[str]:
    """Issue #18's targets (``"issue": 18``), side by side, before everything else."""
    rows = []
    scenarios = results.get("scenarios", [])
    order = {key: i for i, key in enumerate(SUMMARY_ORDER)}
    for scenario in sorted(scenarios, key=lambda s: order.get(s.get("id"), len(order))):
        for t in scenario.get("targets", []):
            if t.get("issue") == SUMMARY_ISSUE:
                value, met = _target_cells(t)
                rows.append([_escape(str(t.get("name", ""))), _escape(str(t.get("target", ""))),
                             value, met, fmt_cell(t.get("detail", "")),
                             f"`{_escape(str(scenario.get('id', '')))}`"])  # fmt: skip
    if not rows:
        return []
    header = ["target", "required", "value", "met", "detail", "scenario"]
    return [f"## Issue #{SUMMARY_ISSUE}, side by side", "", *md_table(header, rows), ""]


def _targets(results: dict[str, Any]) -> list[str]:
    rows = []
    for scenario in results.get("scenarios", []):
        for t in scenario.get("targets", []):
            value, met = _target_cells(t)
            rows.append([_escape(str(scenario.get("title", scenario.get("id", "")))),
                         _escape(str(t.get("name", ""))), _escape(str(t.get("target", ""))),
                         value, met, fmt_cell(t.get("detail", "")),
                         f"#{t['issue']}" if t.get("issue") else ""])  # fmt: skip
    header = ["scenario", "target", "required", "value", "met", "detail", "issue"]
    return ["## Targets", "", *md_table(header, rows), ""] if rows else []


def _points(scenario: dict[str, Any]) -> list[str]:
    entries = [(s, p) for s in scenario.get("series", []) for p in s.get("points", [])]
    if not entries:
        return []
    units = {str(p.get("unit", "")) for _, p in entries}
    unit = units.pop() if len(units) == 1 else None
    gaps = any(key in (p.get("extra") or {}) for _, p in entries for key in GAP_KEYS)
    header = ["series", "generator", "concurrency", "throughput" + (f" ({unit})" if unit else "")]
    header += ["p50 ms", "p90 ms", "p99 ms", "ok", "failed"]
    header += ["gap p50 ms", "gap p90 ms", "gap p99 ms"] if gaps else []
    rows = []
    for series, p in entries:
        throughput = fmt_throughput(p.get("throughput"))
        if not unit and p.get("unit") and throughput != _MISSING:
            throughput += f" {p['unit']}"
        failed = p.get("failed")
        failed = f"**{failed}**" if isinstance(failed, int) and failed > 0 else fmt_cell(failed)
        row = [_escape(str(series.get("label") or p.get("label", ""))),
               _escape(str(p.get("generator") or series.get("generator", ""))),
               fmt_cell(p.get("concurrency")), throughput,
               *(fmt_ms(p.get(key)) for key, _, _ in LATENCIES), fmt_cell(p.get("ok")),
               failed]  # fmt: skip
        extra = p.get("extra") or {}
        rows.append(row + ([fmt_ms(extra.get(k)) for k in GAP_KEYS] if gaps else []))
    return [*md_table(header, rows), ""]


def _scenario(scenario: dict[str, Any], plots: dict[str, str]) -> list[str]:
    title = str(scenario.get("title", scenario.get("id", "")))
    lines = [f"## {title}", ""]
    if scenario.get("description"):
        lines += [str(scenario["description"]).strip(), ""]
    if settings := scenario.get("settings") or {}:
        cells = {
            k: ",".join(fmt_cell(x) for x in v) if isinstance(v, list | tuple)
            else v if isinstance(v, str) else fmt_cell(v)
            for k, v in settings.items()
        }  # fmt: skip
        lines += ["**Settings:** " + " ".join(f"`{k}={c}`" for k, c in cells.items()), ""]
    lines += _points(scenario)
    for table in scenario.get("tables", []):
        rows = [[fmt_cell(c) for c in row] for row in table.get("rows", [])]
        header = [str(h) for h in table.get("header", [])]
        lines += [f"### {table.get('title', '')}", "", *md_table(header, rows), ""]
    if scenario.get("id") in plots:
        lines += [f"![{title}]({plots[scenario['id']]})", ""]
    elif wants_plot(scenario):
        lines += ["_No plot: matplotlib was not available to draw it._", ""]
    if notes := scenario.get("notes") or []:
        lines += [*(f"- {n}" for n in notes), ""]
    return lines


def render_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The report as markdown; ``plots``: scenario id -> its plot's file name, relative."""
    lines = _header(results) + _summary(results) + _targets(results)
    if failures := results.get("failures") or []:
        lines += [
            f"## Failures ({len(failures)})",
            "",
            *(f"- **{_escape(str(f))}**" for f in failures),
            "",
        ]
    for scenario in results.get("scenarios", []):
        lines += _scenario(scenario, plots)
    if logs := results.get("logs") or {}:
        lines += ["## Server logs (WARNING and above)", ""]
        for name, text in logs.items():
            lines += [f"{name}:", "", "```", text, "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# Plots -------------------------------------------------------------------------------------------


def _xy(points: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(concurrency, value) pairs sorted by concurrency; a missing value stays NaN (a gap)."""
    pairs = sorted(
        (float(p["concurrency"]), math.nan if (v := _number(p.get(key))) is None else v)
        for p in points
        if (_number(p.get("concurrency")) or 0) > 0
    )
    return [c for c, _ in pairs], [v for _, v in pairs]


def draw_plot(scenario: dict[str, Any], path: Path) -> None:
    """Throughput and latency against concurrency, side by side, as a PNG at ``path``.
    ImportError without matplotlib."""
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    # Figure + the Agg canvas directly, not pyplot: no global state, no backend to pick.
    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(str(scenario.get("title", scenario.get("id", ""))), fontsize=13)
    left, right = fig.subplots(1, 2)
    series = scenario.get("series", [])
    colours = [f"C{i % 10}" for i in range(len(series))]
    units = {str(p["unit"]): 0 for s in series for p in s["points"] if p.get("unit")}
    latencies: list[float] = []
    for colour, s in zip(colours, series, strict=True):
        left.plot(*_xy(s["points"], "throughput"), marker="o", color=colour, label=s.get("label"))
        for key, style, _ in LATENCIES:
            x, y = _xy(s["points"], key)
            y = [v if v > 0 else math.nan for v in y]  # a log axis cannot show 0
            latencies += [v for v in y if not math.isnan(v)]
            right.plot(x, y, linestyle=style, marker=".", color=colour)
    ticks = _concurrencies(series)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
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
        right.yaxis.set_major_locator(
            ticker.LogLocator(base=10, subs=(1, 2, 5) if decades < 3 else (1,))
        )
        right.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        right.yaxis.set_minor_formatter(ticker.NullFormatter())
    # Colours are the series of the left panel; this legend only says which line is which.
    handles = [Line2D([], [], color="0.3", linestyle=st, label=lab) for _, st, lab in LATENCIES]
    handles += [
        Line2D([], [], color=c, label=s.get("label")) for c, s in zip(colours, series, strict=True)
    ]
    right.legend(handles=handles, fontsize=9, loc="best", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI, format="png")


# Files -------------------------------------------------------------------------------------------


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and the plots into ``out_dir``; the paths
    written: ``"json"``, ``"md"``, and ``"plot:<scenario id>"`` per plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(str(results.get("name", "report")))
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    for scenario in filter(wants_plot, results.get("scenarios", [])):
        path = out_dir / f"{stem}-{file_stem(str(scenario['id']))}.png"
        try:
            draw_plot(scenario, path)
        except ImportError:
            break
        plots[scenario["id"]] = path.name
        written[f"plot:{scenario['id']}"] = path
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    # allow_nan=False: a NaN that json_safe missed fails here, not in a reader's parser.
    text = json.dumps(json_safe(results), indent=2, allow_nan=False, default=str)
    json_path.write_text(text + "\n", encoding="utf-8")
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
