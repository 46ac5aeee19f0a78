"""The report's table as printed (compress, recipes, `tn-hf inspect`) and in the model card: narrow
columns, and each reason for keeping a layer dense or note given once, as a numbered footnote; the
card's figure and load code."""
from tn_hf.report import LINE_WIDTH, CompressionReport

WHY = "TN form not smaller (4224 >= 4160 weight params)"
NOTE = "1.50x, not 4x: ranks are capped by the tensor's shape"


def _row(name: str, *, kept: str | None = None, note: str | None = None) -> dict:
    """A report row as compress writes it (``cost.kept_dense_row`` for a layer kept dense)."""
    tn = 4160 if kept else 1000
    row = {"name": name, "type": "Linear", "tn_type": f"kept dense: {kept}" if kept else "TTLinear",
           "dense_params": 4160, "tn_params": tn, "ratio": 4160 / tn, "ranks": None if kept else [1, 4, 16, 4, 1],
           "rel_error": 0.0 if kept else 0.0123, "flops_dense": 1811939328,
           "flops_tn": 1811939328 if kept else 52428800}
    if kept:
        row["kept_dense"] = kept
    if note:
        row["note"] = note
    return row


def _report(prefix: str) -> CompressionReport:
    rows = [_row(f"{prefix}{i}.{k}", kept=WHY if k == "value" else None, note=NOTE if k == "key" else None)
            for i in range(8) for k in ("query", "key", "value")]
    return CompressionReport.build(rows, model_params_tn=500_000, requested_ratio=4.0, flops_per="sample")


def test_table_is_narrow_and_each_reason_is_one_footnote():
    for prefix in ("blocks.", "videomae.encoder.layer.12345.attention.attention.self."):  # short, long names
        report = _report(prefix)
        text = str(report)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= LINE_WIDTH, text
        assert text.count(WHY) == 1 and text.count(NOTE) == 1, text
        assert lines[-2:] == [f"[1] {NOTE}", f"[2] kept dense: {WHY}"]
        values = {}  # layer name -> the line with its values
        for i, line in enumerate(lines):
            for r in report.rows:
                if line.startswith(r["name"] + " "):
                    values[r["name"]] = line
                elif line == r["name"]:  # a long name has a line of its own, its values below it
                    values[r["name"]] = lines[i + 1]
        assert set(values) == {r["name"] for r in report.rows}
        for name, line in values.items():
            cells = line.split()
            if name.endswith("value"):
                assert cells[-1] == "[2]" and "dense" in cells and "4,160" in cells
            elif name.endswith("key"):
                assert cells[-1] == "[1]" and "TTLinear" in cells and "1-4-16-4-1" in cells
            else:
                assert cells[-1] == "52.4M"  # FLOPs with a unit; no mark
    assert any(line.startswith("blocks.0.query ") for line in str(_report("blocks.")).splitlines())  # one line


def test_card_table_gives_each_reason_once():
    md = _report("blocks.").to_markdown()
    assert md.count(WHY.replace(">", "&gt;")) == 1 and md.count(NOTE) == 1
    assert md.count("| [2] |") == 8 and md.count("| [1] |") == 8


def test_card_figure_legend_covers_no_bar_or_label():
    from tn_hf.cards import compression_figure
    rows = [{"name": f"layer{i}.conv", "dense_params": 1000 * (i + 1), "tn_params": 100 * (i + 1)} for i in range(6)]
    fig = compression_figure(rows)
    fig.canvas.draw()
    ax = fig.axes[0]
    legends = list(fig.legends) + ([ax.get_legend()] if ax.get_legend() else [])
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["dense", "tensor network"]
    box = legends[0].get_window_extent()
    drawn = list(ax.patches) + list(ax.texts)
    assert len(drawn) == 3 * len(rows)  # two bars and a ratio label per layer
    assert not any(a.get_window_extent().overlaps(box) for a in drawn)


def test_card_shows_each_load_call_once():
    from tn_hf.cards import render_model_card
    from tn_hf.demo import SmallCNN
    empty = {"rows": [], "totals": {}}
    card, _ = render_model_card(SmallCNN(), report=empty, library_name="pytorch", local_path="outputs/demo")
    assert str(card).count('model = tn_hf.from_pretrained("outputs/demo", model_class=SmallCNN)') == 1
    assert "tn_hf's own loader" not in str(card)
    card, _ = render_model_card(SmallCNN(), report=empty, library_name="timm", local_path="out/r")
    text = str(card)
    assert text.count('timm.create_model("local-dir:out/r", pretrained=True)') == 1
    assert text.count("or, with tn_hf's own loader: `model = tn_hf.from_pretrained(\"out/r\")`.") == 1
