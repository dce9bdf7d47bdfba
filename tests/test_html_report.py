"""report.html: the heatmap grid, peaks, sparklines and the page, from plain rows."""

from __future__ import annotations

import math

from flexbench import html_report

H100 = "NVIDIA H100 80GB HBM3"


def row(mod: str, seq: int, fwd: float, bwd: float | None = None, **extra) -> dict:
    out = {
        "run_name": f"{mod} b8 h16 s{seq} d128 bf16",
        "shape": f"8,16,{seq},128",
        "heads": 16,
        "kv_heads": 16,
        "q_len": seq,
        "kv_len": seq,
        "score_mod": mod,
        "dtype": "bfloat16",
        "status": "FINISHED",
        "fwd_speedup": fwd,
        "fwd_compiled_us": 100.0,
        "fwd_compiled_tflops": 494.5,
        "fwd_eager_tflops": 300.0,
        "fwd_compiled_tbps": 1.0,
        "fwd_eager_tbps": 0.8,
        "gpu": H100,
        "torch": "2.11.0",
        **extra,
    }
    if bwd is not None:
        out["bwd_speedup"] = bwd
    return out


def failed(mod: str, seq: int, error: str) -> dict:
    base = row(mod, seq, 1.0)
    return {k: v for k, v in base.items() if "_" not in k or k in ("run_name", "score_mod")} | {
        "status": "FAILED",
        "error": error,
        "shape": f"8,16,{seq},128",
        "heads": 16,
        "kv_heads": 16,
        "q_len": seq,
        "kv_len": seq,
    }


ROWS = [
    row("noop", 1024, 0.8, 1.1),
    row("causal", 1024, 1.5, 1.2),
    row("noop", 4096, 0.9, 1.0),
    failed("causal", 4096, "OutOfMemoryError: <CUDA> out of memory"),
]


def test_grid_is_mods_by_shapes_with_failures_marked():
    mods, cols, values = html_report.grid(ROWS, "fwd")
    assert mods == ["noop", "causal"] and cols == ["8,16,1024,128", "8,16,4096,128"]
    assert values[0] == [0.8, 0.9] and values[1][0] == 1.5 and values[1][1] == -math.inf
    gqa = row("noop", 1024, 1.0, kv_heads=4, kv_len=8192)
    assert html_report.grid([gqa], "fwd")[1] == ["8,16,1024,128 kvh4 kv8192"]


def test_peaks_only_for_known_gpus_and_16_bit_dtypes():
    assert html_report.peak(H100, "bfloat16") == (989.0, 3.35)
    assert html_report.peak("NVIDIA H100 PCIe", "float16") == (756.0, 2.0)
    assert html_report.peak(H100, "float32") is None
    assert html_report.peak("Some Future GPU", "bfloat16") is None


def test_sparkline_points_by_hand():
    svg = html_report.sparkline_svg([1.0, 2.0, 3.0])
    # x = 2 + i * 116 / 2; y = 22 - (v - 1) / 2 * 20
    assert 'points="2.0,22.0 60.0,12.0 118.0,2.0"' in svg
    assert html_report.sparkline_svg([5.0]) == ""  # one sweep: no trend


def test_page_is_self_contained_with_heatmap_peak_history_and_failures():
    page = html_report.render(ROWS, "nightly", {"noop b8 h16 s1024 d128 bf16": [90.0, 100.0]})
    assert page.count('src="data:image/png;base64,') == 2  # heatmap and roofline
    assert 'id="heatmap"' in page and "<polyline" in page
    assert "50.0%" in page  # 494.5 of the H100's 989 TFLOP/s
    assert "OutOfMemoryError: &lt;CUDA&gt; out of memory" in page  # escaped
    assert H100 in page and "2.11.0" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere


def test_heatmap_of_a_huge_sweep_stays_a_sane_size():
    rows = [row(f"m{i % 10}", 64 * (i // 10 + 1), 1.0) for i in range(2000)]
    figure = html_report.heatmap_figure(rows)
    try:
        assert figure.get_size_inches()[0] <= html_report.FIGURE_MAX_IN
    finally:
        html_report._pyplot().close(figure)


def test_a_heatmap_drawn_once_is_embedded_as_given(monkeypatch):
    """The sweep's artifacts draw the heatmap once (heatmap.png) and hand it to the page."""
    png = html_report.heatmap_png(ROWS)
    assert png is not None and png.startswith(b"\x89PNG")
    drawn = []
    monkeypatch.setattr(html_report, "heatmap_figure", lambda rows: drawn.append(rows))
    page = html_report.render(ROWS, "nightly", heatmap=png)
    assert drawn == []  # not drawn again
    assert html_report.png_uri(png) in page
