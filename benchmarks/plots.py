"""The figures of benchmarks/results/: one function per figure, each reading a benchmark's JSON and
writing a PNG of the same name next to it. The benchmark scripts call them after writing their JSON;

    python benchmarks/plots.py

redraws every figure from the JSON in benchmarks/results/."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FORMAT_ORDER = {"tt": 0, "tr": 1, "tucker": 2, "bt": 3}
STAGES = (("acc_decomposed", "right after the decomposition"), ("acc_finetuned", "after fine-tuning"))


def _load(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _save(fig: Figure, json_path: Path | str, title: str) -> Path:
    fig.suptitle(title)
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png


def _ratio_axis(ax: Axes, ticks: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def admm(json_path: Path | str, title: str) -> Path:
    """Accuracy vs compression ratio, ADMM (scheduler defaults) vs direct decomposition, one column per
    format; mean and std over seeds (admm_mnist.json, admm_lstm_*.json)."""
    data = _load(json_path)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for key, cell in data["cells"].items():
        fmt, ratio, _seed = key.split("|")
        groups.setdefault((fmt, float(ratio)), []).append(cell)
    formats = sorted({fmt for fmt, _ in groups}, key=lambda f: (FORMAT_ORDER.get(f, len(FORMAT_ORDER)), f))
    dense = [v["acc"] for v in data["dense"].values()]
    fig, axes = plt.subplots(2, len(formats), figsize=(4.2 * len(formats), 6.5), sharex="col",
                             sharey="row", squeeze=False, layout="constrained")
    for col, fmt in enumerate(formats):
        ratios = sorted(r for f, r in groups if f == fmt)
        for row, (stage, label) in enumerate(STAGES):
            ax = axes[row][col]
            for arm, name, color in (("direct", "direct decomposition", "C0"), ("admm_default", "ADMM", "C1")):
                xs = [_mean_std([c["target_ratio"] for c in groups[fmt, r]])[0] for r in ratios]
                ys = [_mean_std([c[arm][stage] for c in groups[fmt, r]]) for r in ratios]
                ax.errorbar(xs, [m for m, _ in ys], yerr=[s for _, s in ys], marker="o", capsize=3,
                            color=color, label=name)
            ax.axhline(statistics.mean(dense), color="grey", linestyle=":", label="dense")
            _ratio_axis(ax, ratios)
            ax.set_title(f"{fmt.upper()}, {label}", fontsize=10)
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
            if row == len(STAGES) - 1:
                ax.set_xlabel("compression ratio of the targets")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return _save(fig, json_path, title)


def tucker(json_path: Path | str, title: str) -> Path:
    """Accuracy vs compression ratio per format (direct; ADMM dashed where run), one row per model
    (tucker_mnist.json). SCADA-Tucker (one shared core) is a point per rank, not a ratio sweep."""
    data = _load(json_path)
    models = list(data)
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.3 * len(models)), squeeze=False,
                             layout="constrained")
    colors: dict[str, str] = {}
    for row, model in enumerate(models):
        res = data[model]
        rows = [r for r in res["rows"] if "error" not in r]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        for col, (stage, label) in enumerate(STAGES):
            ax = axes[row][col]
            for v in variants:
                color = colors.setdefault(v, f"C{len(colors)}")
                rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["weight_ratio"])
                xs = [r["weight_ratio"] for r in rs]
                style = dict(marker="*", markersize=10, linestyle="none") if v == "tucker-shared" else dict(marker="o")
                ax.plot(xs, [r[stage] for r in rs], color=color, label=v, **style)
                if "admm_" + stage in rs[0]:
                    ax.plot(xs, [r["admm_" + stage] for r in rs], color=color, marker="s", linestyle="--",
                            label=f"{v} + ADMM")
            ax.axhline(res["dense_acc"], color="grey", linestyle=":", label="dense")
            ratios = sorted({r["requested"] for r in rows if isinstance(r["requested"], (int, float))})
            _ratio_axis(ax, ratios)
            ax.set_title(f"{model}, {label}", fontsize=10)
            ax.set_ylabel("test accuracy (%)")
            if row == len(models) - 1:
                ax.set_xlabel("compression ratio of the compressed layers' weights")
    labels: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(lab, h)
    fig.legend(list(labels.values()), list(labels), loc="outside lower center", ncol=4)
    return _save(fig, json_path, title)


def decompose(json_path: Path | str, title: str) -> Path:
    """Seconds per resnet18 weight, tn_hf vs tensorly, TT and TR, against the tensor's size
    (decompose.json; both reach the same error)."""
    data = _load(json_path)
    rows = data["rows"]
    sizes = [math.prod(int(n) for n in r["shape"].split("x")) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    panels = (("TT", (("t_tl_tt", "tensorly tensor_train"), ("t_tt", "tn_hf tt_svd"), ("t_proj", "tn_hf tt_project"))),
              ("TR", (("t_tl_tr", "tensorly tensor_ring"), ("t_tr", "tn_hf tr_svd"))))
    for ax, (fmt, series) in zip(axes, panels):
        for key, label in series:
            ax.scatter(sizes, [r[key] for r in rows], label=f"{label} ({sum(r[key] for r in rows):.2f} s in all)",
                       marker="x" if key.startswith("t_tl") else "o", alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(f"{fmt}, ~{data['ratio']:g}x per weight", fontsize=10)
        ax.set_xlabel("weight size (elements)")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("seconds per decomposition (median)")
    return _save(fig, json_path, title)


def _speed_rows(data: dict[str, Any], modes: Sequence[str], ratio: float) -> dict[str, dict[int, dict[str, Any]]]:
    """Per model, its rows by batch: the first of ``modes`` measured for it, at ``ratio`` where measured
    (else its lowest ratio)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        mine = [r for r in data["rows"] if r["model"] == model and r["mode"] in modes]
        if not mine:
            continue
        mode = min((r["mode"] for r in mine), key=list(modes).index)
        mine = [r for r in mine if r["mode"] == mode]
        ratios = {r["ratio"] for r in mine}
        at = ratio if ratio in ratios else min(ratios)
        out[model] = {r["batch"]: r for r in mine if r["ratio"] == at}
    return out


def speed(json_path: Path | str, title: str, modes: Sequence[str] = ("eval, TNConfig defaults", "eval"),
          ratio: float = 3.0, batches: Sequence[int] = (1, 32)) -> Path:
    """Eval time of the compressed model over the dense one per model, one panel per batch size, with
    the floor: the dense model with its target layers costing nothing (speed_models.json,
    speed_unlisted.json). Per model the first of ``modes`` it was measured in, at ``ratio`` where
    measured."""
    picked = _speed_rows(_load(json_path), modes, ratio)
    models = sorted(picked, key=lambda m: max(r["time_ratio"] for r in picked[m].values()), reverse=True)
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 0.42 * len(models) + 1.6), sharey=True,
                             squeeze=False, layout="constrained")
    ys = range(len(models))
    for ax, batch in zip(axes[0], batches):
        rows = [picked[m].get(batch) for m in models]
        time = [r["time_ratio"] if r else float("nan") for r in rows]
        floor = [r.get("floor_ratio") if r and r.get("floor_ratio") is not None else float("nan") for r in rows]
        ax.barh(ys, time, height=0.7, color="C0", alpha=0.55, label="compressed / dense")
        ax.barh(ys, floor, height=0.3, color="black", alpha=0.7, label="floor: targets at zero cost")
        for y, t in zip(ys, time):
            if t == t:
                ax.text(t + 0.02, y, f"{t:.2f}", va="center", fontsize=8)
        ax.axvline(1.0, color="C3", linestyle="--", label="dense")
        ax.set_xlim(0, max(1.25, max((t for t in time if t == t), default=1.0) + 0.15))
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xlabel("eval time, compressed / dense (lower is faster)")
        ax.grid(axis="x", alpha=0.3)
    labels = []
    for m in models:
        r = next(iter(picked[m].values()))
        labels.append(f"{m} {r['ratio']:g}x" + ("" if r["mode"] == modes[0] else f" [{r['mode']}]"))
    axes[0][0].set_yticks(list(ys), labels)
    axes[0][0].invert_yaxis()
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=3)
    env = _load(json_path).get("env", {})
    return _save(fig, json_path, f"{title} (rows '{modes[0]}' unless named)\n{env.get('device', '?')}, "
                                 f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')}")


def bt_compare(json_path: Path | str, title: str) -> Path:
    """Accuracy per format (mean +- std over seeds) right after the decomposition and after
    fine-tuning, one panel per task, dense as a dotted line (bt_compare.json)."""
    data = _load(json_path)
    tasks = list(data["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], tasks):
        res = data["tasks"][name]
        fmts = list(dict.fromkeys(r["format"] for r in res["rows"]))
        for i, (stage, label) in enumerate(STAGES):
            stats = [_mean_std([r[stage] for r in res["rows"] if r["format"] == f]) for f in fmts]
            ax.bar([k + 0.38 * i for k in range(len(fmts))], [m for m, _ in stats], 0.36,
                   yerr=[s for _, s in stats], color=f"C{i}", label=label, capsize=3)
        ax.axhline(statistics.mean(v["acc"] for v in res["dense"].values()), color="grey", linestyle=":",
                   label="dense")
        ax.set_xticks([k + 0.19 for k in range(len(fmts))], [f.upper() for f in fmts])
        ax.set_title(f"{name} ({data['settings'][name]['ratio']:g}x)", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return _save(fig, json_path, title)


FIGURES: dict[str, tuple[Callable[[Path, str], Path], str]] = {
    "bt_compare": (bt_compare, "Block-term vs TT vs Tucker at the same parameter budget (3 seeds)"),
    "admm_mnist": (admm, "ADMM vs direct decomposition: SmallCNN on MNIST-5k (3 seeds)"),
    "admm_lstm_vowels": (admm, "ADMM vs direct decomposition: LSTM on JapaneseVowels (3 seeds)"),
    "admm_lstm_basicmotions": (admm, "ADMM vs direct decomposition: LSTM on BasicMotions (3 seeds)"),
    "tucker_mnist": (tucker, "Tucker vs TT vs TR on MNIST-5k"),
    "decompose": (decompose, "Decomposition time: tn_hf vs tensorly, every resnet18 weight"),
    "speed_models": (speed, "Whole-model eval time vs dense"),
    "speed_unlisted": (speed, "Whole-model eval time vs dense, more timm models"),
}


def draw(json_path: Path | str, like: str | None = None) -> Path:
    """Draw the figure of a benchmark's JSON: the one FIGURES names for its file name, else ``like``'s."""
    name = Path(json_path).stem if Path(json_path).stem in FIGURES else like
    if name not in FIGURES:
        raise ValueError(f"no figure for {Path(json_path).name}; figures: {', '.join(f'{n}.json' for n in FIGURES)}")
    fn, title = FIGURES[name]
    return fn(Path(json_path), title)


def main() -> None:
    for name in FIGURES:
        if (RESULTS / f"{name}.json").is_file():
            print(f"wrote {draw(RESULTS / f'{name}.json')}")


if __name__ == "__main__":
    main()
