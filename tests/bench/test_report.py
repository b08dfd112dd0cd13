"""bench/_report.py: the suite's JSON, markdown and plots from one results dict."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
# bench/ is a folder of scripts that import each other by plain name, as the suite does.
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
report = importlib.import_module("_report")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _point(series: str, concurrency: int, throughput: float, **extra: float) -> dict[str, Any]:
    return {
        "label": series,
        "generator": "perf_analyzer",
        "concurrency": concurrency,
        "ok": 100 * concurrency,
        "failed": 0,
        "seconds": 5.0,
        "throughput": throughput,
        "unit": "infer/s",
        "p50_ms": 0.5 * concurrency,
        "p90_ms": 0.8 * concurrency,
        "p99_ms": 1.3 * concurrency,
        "extra": extra,
    }


def _results() -> dict[str, Any]:
    gateway = {
        "id": "gateway",
        "title": "Gateway overhead: unary calls",
        "description": "gRPC straight to the server against REST through the gateway.",
        "settings": {"seconds": 5, "concurrency": [1, 4, 16], "model": "bytelm"},
        "series": [
            {
                "label": "gRPC direct",
                "generator": "perf_analyzer",
                "points": [_point("gRPC direct", c, t) for c, t in ((1, 310.4), (4, 1012.0))]
                + [_point("gRPC direct", 16, math.nan)],
            },
            {
                "label": "REST via gateway",
                "generator": "perf_analyzer",
                "points": [_point("REST via gateway", c, t) for c, t in ((1, 250.0), (4, 800.5))],
            },
        ],
        "plot": True,
        "tables": [
            {
                "title": "Memory (RSS, MiB)",
                "header": ["process", "idle", "peak under load"],
                "rows": [["server", 210.3, 250.1], ["gateway", 88.0, math.nan]],
            }
        ],
        "targets": [
            {
                "name": "REST / gRPC throughput at concurrency 4",
                "value": 800.5 / 1012.0,
                "target": ">= 0.90",
                "met": False,
                "detail": "800 vs 1012 infer/s",
            }
        ],
        "notes": ["perf_analyzer ran on the same cores as the server."],
    }
    streams = {
        "id": "streams",
        "title": "Token streams over SSE",
        "description": "One concurrency only: no plot.",
        "settings": {"max_new_tokens": 64},
        "series": [
            {
                "label": "SSE",
                "generator": "httpx",
                "points": [
                    _point("SSE", 8, 512.0, gap_p50_ms=4.1, gap_p90_ms=6.0, gap_p99_ms=0.042)
                ],
            }
        ],
        "plot": True,
        "tables": [],
        "targets": [{"name": "gap p99 under 50 ms", "value": 0.042, "target": "< 50", "met": True}],
        "notes": [],
    }
    return {
        "title": "protoserve benchmarks",
        "name": "2026-11-23-quick",
        "started": "2026-11-23T10:00:00+00:00",
        "wall_s": 312.5,
        "quick": True,
        "setup_s": 95.0,
        "command": "nox -s bench -- --quick",
        "machine": {
            "cpu": "Test CPU",
            "cpus": 2,
            "memory_gib": 7.8,
            "os": "Linux",
            "load_before": [0.5, 0.4, 0.3],
        },
        "versions": {"protoserve": "0.1.0", "torch": "2.13.0"},
        "scenarios": [gateway, streams],
        "failures": ["REST via gateway: 3 requests failed with UNAVAILABLE"],
    }


def test_json_keeps_the_figures_with_nan_as_null(tmp_path: Path) -> None:
    paths = report.write_report(_results(), tmp_path)
    assert paths["json"] == tmp_path / "2026-11-23-quick.json"
    loaded = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert loaded["scenarios"][0]["series"][0]["points"][2]["throughput"] is None
    assert loaded["scenarios"][0]["tables"][0]["rows"][1] == ["gateway", 88.0, None]
    assert list(loaded) == list(_results())  # keys in the order given
    assert "NaN" not in paths["json"].read_text(encoding="utf-8")


def test_markdown_has_targets_failures_scenarios_and_plot_link(tmp_path: Path) -> None:
    md = report.write_report(_results(), tmp_path)["md"].read_text(encoding="utf-8")
    assert md.startswith("# protoserve benchmarks: 2026-11-23-quick\n")
    assert "`nox -s bench -- --quick`" in md and "quick mode" in md
    # The timed run and the one-off set-up (the peers' virtualenvs) apart.
    assert "wall time 5 min 12 s · set-up before it 1 min 35 s" in md
    # Targets come first, before any scenario, with the failed one in bold.
    assert md.index("## Targets") < md.index("## Failures") < md.index("## Gateway overhead")
    assert "| Gateway overhead: unary calls | REST / gRPC throughput" in md
    assert "| 0.791 | **not met** |" in md
    assert "| 0.0420 | met |" in md
    assert "- **REST via gateway: 3 requests failed with UNAVAILABLE**" in md
    assert "## Gateway overhead: unary calls" in md and "## Token streams over SSE" in md
    assert "### Memory (RSS, MiB)" in md and "| gateway | 88.0 | - |" in md
    # The NaN throughput is a dash; the gap columns appear only where a point has them.
    assert "| gRPC direct | perf_analyzer | 16 | - | 8.0 | 12.8 | 20.8 | 1600 | 0 |" in md
    gateway, streams = md.split("## Token streams over SSE")
    assert "gap p99 ms" not in gateway and "gap p99 ms" in streams
    assert "| 4.1 | 6.0 | 0.042 |" in streams


def test_markdown_links_the_plots_it_is_given() -> None:
    name = "2026-11-23-quick-gateway.png"
    md = report.render_markdown(_results(), {"gateway": name})
    assert f"![Gateway overhead: unary calls]({name})" in md
    assert "_No plot" not in md
    # Without matplotlib write_report draws nothing; the reader is told why.
    assert "_No plot: matplotlib was not available to draw it._" in report.render_markdown(
        _results(), {}
    )


def test_number_formats() -> None:
    assert report.fmt_throughput(1446.3) == "1446"
    assert report.fmt_throughput(42.17) == "42.2"
    assert report.fmt_throughput(9.996) == "10.0"
    assert report.fmt_throughput(math.nan) == "-"
    assert report.fmt_ms(3.24) == "3.2"
    assert report.fmt_ms(0.0345) == "0.035"
    assert report.fmt_ms(None) == "-"
    assert report.fmt_ratio(0.8456) == "0.85"


def test_plot_is_a_png_of_the_promised_size(tmp_path: Path) -> None:
    from matplotlib.image import imread

    paths = report.write_report(_results(), tmp_path)
    png = paths["plot:gateway"]
    assert png == tmp_path / "2026-11-23-quick-gateway.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    link = "![Gateway overhead: unary calls](2026-11-23-quick-gateway.png)"
    assert link in paths["md"].read_text(encoding="utf-8")
    height, width = imread(png).shape[:2]
    assert (width, height) == (1200, 450)


def test_one_concurrency_gets_no_plot(tmp_path: Path) -> None:
    paths = report.write_report(_results(), tmp_path)
    assert "plot:streams" not in paths
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["2026-11-23-quick-gateway.png"]
    assert "streams.png" not in paths["md"].read_text(encoding="utf-8")


def test_main_renders_again_from_the_json(tmp_path: Path) -> None:
    first = report.write_report(_results(), tmp_path / "first")
    assert report.main([str(first["json"]), str(tmp_path / "again")]) == 0
    again = tmp_path / "again" / "2026-11-23-quick.md"
    assert again.read_text(encoding="utf-8") == first["md"].read_text(encoding="utf-8")
