"""Evaluation reports: tables, the JSON round trip, series of the plot, the PNG itself."""

from __future__ import annotations

import json

import pytest

from megatron_opdlm.evaluation import report


def _model(name, kind, tokens, accuracy, kl, tpf=1.0):
    rows = {"ar": None} if kind == "ar" else {"static": None, "dynamic_0.9": None}
    decoding = {
        setting: {
            "tokens": 40,
            "forwards": int(40 / tpf),
            "tokens_per_forward": tpf,
            "seconds": 2.0,
            "tokens_per_second": 20.0,
            "teacher_nll": 1.5,
            "mean_length": 10,
        }
        for setting in rows
    }
    return {
        "name": name,
        "kind": kind,
        "training_tokens": tokens,
        "teacher_nll": 1.5,
        "kl": kl,
        "qa": {"accuracy": accuracy, "correct": 1, "total": 2},
        "decoding": decoding,
    }


def _result(*models):
    return {"format": report.FORMAT, "settings": {}, "environment": {}, "models": list(models)}


def test_tables_list_every_model_and_setting():
    text = report.format_tables(
        _result(
            _model("teacher", "ar", None, 0.8, 0.0),
            _model("student", "diffusion", 5000, 0.5, 0.25, 1.9),
        )
    )
    quality, speed = text.split("\n\n")
    assert "QA acc" in quality and "KL(T||S)" in quality
    rows = [line.split() for line in quality.splitlines()[2:]]
    assert rows == [
        ["teacher", "ar", "-", "0.800", "1.500", "0.0000"],
        ["student", "diffusion", "5000", "0.500", "1.500", "0.2500"],
    ]
    speed_rows = [line.split()[:4] for line in speed.splitlines()[2:]]
    assert speed_rows == [
        ["teacher", "ar", "40", "1.00"],
        ["student", "static", "40", "1.90"],
        ["student", "dynamic_0.9", "40", "1.90"],
    ]


def test_json_round_trip_and_format_check(tmp_path):
    result = _result(_model("teacher", "ar", None, 0.8, 0.0))
    path = report.write_json(result, tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text()) == result
    assert not list(path.parent.glob(".*tmp"))  # the temporary file was renamed
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not an evaluation file"):
        report.read_results([tmp_path / "other.json"])


def test_plot_series_start_at_the_untrained_student():
    runs = [
        _result(
            _model("teacher", "ar", None, 0.8, 0.0),
            _model("init", "diffusion", 0, 0.1, 2.0),
            _model("student", "diffusion", 2000, 0.3, 1.0),
        ),
        _result(_model("student", "diffusion", 1000, 0.2, 1.5)),
        _result(_model("student", "diffusion", 4000, 0.5, 0.5)),
        _result(
            _model("mdlm@a", "diffusion", 1000, 0.1, 1.8),
            _model("mdlm@b", "diffusion", 3000, 0.2, 1.7),
        ),
    ]
    series, references = report.plot_series(runs)
    assert list(references) == ["teacher"]
    assert [x for x, _ in series["student"]] == [0, 1000, 2000, 4000]
    assert [m["kl"] for _, m in series["student"]] == [2.0, 1.5, 1.0, 0.5]
    assert [(x, m["kl"]) for x, m in series["mdlm"]] == [(0, 2.0), (1000, 1.8), (3000, 1.7)]


def test_plot_writes_a_png(tmp_path):
    runs = [
        _result(
            _model("teacher", "ar", None, 0.8, 0.0), _model("student", "diffusion", 10, 0.3, 1.0)
        ),
        _result(_model("student", "diffusion", 20, 0.4, 0.7)),
    ]
    path = report.plot(runs, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no model records"):
        report.plot([_result()], tmp_path / "empty.png")
