"""Evaluation reports: console tables, the JSON file, and a PNG of metrics against training tokens.

JSON layout (format "opdlm-eval/1"):

    {"format": "opdlm-eval/1", "settings": {...}, "environment": {...},
     "models": [{"name", "checkpoint", "kind": "ar"|"diffusion", "block_size", "token_shift",
                 "training_tokens", "qa": {"accuracy", "correct", "total", "by_category", ...},
                 "teacher_nll", "kl", "kl_tokens",
                 "decoding": {"ar"|"static"|"dynamic_0.9"...: {"tokens", "forwards",
                              "tokens_per_forward", "seconds", "tokens_per_second",
                              "teacher_nll", "mean_length"}}}, ...]}

The plot reads one or several such files (evaluations at successive checkpoints of a run): a
series is a model name, or its part before "@" (`opdlm@step200`, `opdlm@step400` are two points
of series `opdlm`), over training tokens; an untrained student (training_tokens 0) is the first
point of every series; AR models (the teacher) are horizontal reference lines.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

FORMAT = "opdlm-eval/1"

# (label, getter) of the panels of the plot
PANELS = (
    ("QA exact match", lambda m: m.get("qa", {}).get("accuracy")),
    ("teacher NLL of greedy answers", lambda m: m.get("teacher_nll")),
    ("on-policy forward KL (T || S)", lambda m: m.get("kl")),
    ("tokens / forward (dynamic 0.9)", lambda m: _speed(m, "tokens_per_forward")),
    ("tokens / s (dynamic 0.9)", lambda m: _speed(m, "tokens_per_second")),
)


def _speed(model: dict, key: str):
    rows = model.get("decoding", {})
    row = rows.get("dynamic_0.9") or rows.get("ar")
    return None if row is None else row.get(key)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(
        c.rjust(w) if i else c.ljust(w)  # noqa: E731
        for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_tables(result: dict) -> str:
    """Two console tables: quality per model, then decoding cost per model and setting."""
    models = result["models"]
    quality = [
        [
            m["name"],
            m["kind"],
            _fmt(m.get("training_tokens")),
            _fmt(m.get("qa", {}).get("accuracy")),
            _fmt(m.get("teacher_nll")),
            _fmt(m.get("kl"), 4),
        ]
        for m in models
    ]
    speed = []
    for m in models:
        for name, row in m.get("decoding", {}).items():
            speed.append(
                [
                    m["name"],
                    name,
                    _fmt(row["tokens"]),
                    _fmt(row["tokens_per_forward"], 2),
                    _fmt(row["tokens_per_second"], 1),
                    _fmt(row["teacher_nll"]),
                ]
            )
    parts = [
        _table(["model", "kind", "train tokens", "QA acc", "teacher NLL", "KL(T||S)"], quality)
    ]
    if speed:
        parts.append(
            _table(["model", "decoding", "tokens", "tok/fwd", "tok/s", "teacher NLL"], speed)
        )
    return "\n\n".join(parts)


def write_json(result: dict, path: str | Path) -> Path:
    """Write `result` to `path` through a temporary name (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=float))
    os.replace(tmp, path)
    return path


def read_results(paths: list[str | Path]) -> list[dict]:
    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an evaluation file of format {FORMAT}")
        results.append(data)
    return results


def series_name(model_name: str) -> str:
    """The plot series of a model: its name up to the first "@"."""
    return model_name.split("@", 1)[0]


def plot_series(results: list[dict]) -> tuple[dict[str, list[tuple[int, dict]]], dict[str, dict]]:
    """(series name -> [(training tokens, model record)] sorted, reference name -> AR record)."""
    series: dict[str, list[tuple[int, dict]]] = {}
    references: dict[str, dict] = {}
    starts: list[dict] = []
    for result in results:
        for model in result["models"]:
            tokens = model.get("training_tokens")
            if model["kind"] == "ar":
                references.setdefault(model["name"], model)
            elif not tokens:
                starts.append(model)
            else:
                series.setdefault(series_name(model["name"]), []).append((int(tokens), model))
    if not series and starts:
        series = {series_name(start["name"]): [] for start in starts[:1]}
    for points in series.values():
        points.extend((0, start) for start in starts[:1])
        points.sort(key=lambda point: point[0])
    return series, references


def plot(results: list[dict], path: str | Path) -> Path:
    """PNG of every panel metric against training tokens (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, references = plot_series(results)
    if not series and not references:
        raise ValueError("no model records to plot")
    columns = 3
    rows = math.ceil(len(PANELS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (label, getter) in zip(axes.flat, PANELS):
        for name, points in series.items():
            xy = [(x, getter(m)) for x, m in points if getter(m) is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=name)
        for name, model in references.items():
            value = getter(model)
            if value is not None:
                ax.axhline(value, linestyle="--", color="gray", label=f"{name} (AR)")
        ax.set_title(label)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
