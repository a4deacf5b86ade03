from pipeline.evaluation.charts import (
    ChartFrame, ChartSeries, framed_chart, line_chart, marker, padded_range, scatter_chart, xy_chart)


def test_line_chart_handles_flat_and_empty_series():
    assert line_chart("flat", [1, 2], [3.0, 3.0]).startswith("<svg")
    assert line_chart("empty", [], []) == ""


def test_xy_chart_draws_series_legends_and_references():
    series = [ChartSeries("solid <a>", [(0.0, 0.0), (1.0, 2.0)], "#111", labels=["x", "y"]),
              ChartSeries("dashed", [(0.5, -1.0)], "#222", dashed=True, square=True)]
    svg = xy_chart("t", series, "KL", "score", diagonal=True, zero_line=True)
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and "stroke-dasharray=\"6,3\"" in svg
    assert "solid &lt;a&gt;" in svg and ">x</text>" in svg and svg.count("<rect") == 2  # marker and legend
    assert svg.count('stroke="#999"') == 1 and svg.count('stroke="#bbb"') == 1
    assert xy_chart("t", [ChartSeries("none", [], "#111")], "x", "y") == ""
    assert marker(1, 2, "#333", square=False).startswith("<circle") and padded_range([1.0, 1.0])[0] < 1.0


def test_scatter_chart_draws_a_point_per_pair_and_a_legend_per_policy():
    svg = scatter_chart("reward vs gold", {"sft": [(0.0, 1.0), (1.0, 2.0)], "ppo": [(2.0, 3.0)]}, "reward", "gold")
    assert svg.count("<circle") == 3 and "● sft" in svg and "● ppo" in svg
    assert scatter_chart("empty", {"sft": []}, "x", "y") == ""


def test_framed_chart_labels_both_axes_with_their_ends_and_escapes_text():
    svg = framed_chart(ChartFrame(200, 100, 40, 10, 20, 30), "a <b>", "x & co", "y", (0.0, 2.5), (-1.0, 1.0),
                       ["<circle/>"])
    assert svg.startswith('<svg class="chart" width="200" height="100"') and svg.endswith("<circle/></svg>")
    assert "a &lt;b&gt;" in svg and "x &amp; co" in svg and svg.count('class="axis"') == 2
    assert all(f">{end}</text>" in svg for end in ("0", "2.5", "-1", "1"))
