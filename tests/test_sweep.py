"""The sweep's outputs: link names as the README writes them, honest prediction error,
and pictures that mark the choice and stay readable with many cuts."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.sweep import file_names, file_safe, prediction_errors
from benchmarks.sweep_plots import COMPONENTS, ROW_IN, bytes_plot, latency_plot

README_LINKS = ["10mbit/40ms", "5.85mbit:20mbit/60ms"]


def test_link_names_become_safe_distinct_file_names() -> None:
    assert file_safe("10mbit/40ms") == "10mbit_40ms"
    assert file_safe("5.85mbit:20mbit/60ms") == "5.85mbit-20mbit_60ms"
    assert file_safe("4G") == "4G"
    assert file_safe("../../etc/x") == "_.._etc_x"  # no path, no leading dot
    assert file_safe("ünï cødé") == "_n__c_d_"
    names = file_names(["a/b", "a_b", "A_B", "4G"])
    assert names == {"a/b": "a_b", "a_b": "a_b-2", "A_B": "A_B-3", "4G": "4G"}


def _row(cut: str, i: int, codec: str, predicted: float, measured: float | None, **kw: Any):
    return {
        "model": "m",
        "link": "L",
        "cut": cut,
        "cut_index": i,
        "codec": codec,
        "bytes_up": 1000 * (i + 1),
        "predicted_ms": predicted,
        **{f"pred_{k}": predicted / len(COMPONENTS) for k in COMPONENTS},
        "measured": measured is not None,
        "measured_p50_ms": measured,
        "calibration": kw.get("calibration", False),
        "planner_choice": kw.get("choice", False),
    }


def test_prediction_error_covers_every_measured_pair_baselines_included() -> None:
    rows = [
        _row("input", 0, "raw", 100.0, 80.0),  # all in the cloud: +25%
        _row("input", 0, "zstd:1", 50.0, 200.0, choice=True),  # -75%: the worst
        _row("a", 1, "raw", 10.0, 10.5),
        _row("b", 2, "raw", 10.0, None),  # only predicted: no error
        _row("output", 3, "none", 30.0, 30.0, calibration=True),  # fitted: listed, not scored
    ]
    e = prediction_errors(rows, "L")
    assert [(p["cut"], p["codec"]) for p in e["prediction_errors"]] == [
        ("input", "raw"),
        ("input", "zstd:1"),
        ("a", "raw"),
        ("output", "none"),
    ]
    assert e["prediction_errors_scored"] == 3
    assert e["prediction_error_max"] == pytest.approx(0.75)
    assert e["prediction_error_worst"] == "input zstd:1"
    assert e["prediction_error_median"] == pytest.approx(0.25)
    assert e["baseline_prediction_errors"] == pytest.approx(
        {"all_cloud_raw": 0.25, "all_cloud_zstd": -0.75, "all_edge": 0.0}
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_pictures_stay_readable_with_80_cuts(tmp_path: Path) -> None:
    n = 80
    rows = [
        _row(f"layer{i // 10}.{i % 10}.conv", i, codec, 10.0 + i + k, 11.0 + i if k == 0 else None)
        for i in range(n)
        for k, codec in enumerate(["raw", "int8+zstd:1"])
    ]
    rows[41]["planner_choice"] = True
    lat = latency_plot(rows, "L", tmp_path / "latency.png", slowdown=10)
    size = bytes_plot(rows, tmp_path / "bytes.png")
    for path in (lat, size):
        _, height = _png_size(path)
        assert height >= n * ROW_IN * 110  # one row of at least 0.16 in per cut at 110 dpi


def test_sweep_on_readme_link_specs(digits_weights: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sweep",
            "--model",
            "digits-cnn",
            "--weights",
            str(digits_weights),
            "--links",
            ",".join(README_LINKS),
            "--codecs",
            "raw,int8+zstd:1",
            "--requests",
            "2",
            "--sample",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["bytes.png", "latency-10mbit_40ms.png", "latency-5.85mbit-20mbit_60ms.png"]
    with open(tmp_path / "sweep.csv") as f:
        assert {r["link"] for r in csv.DictReader(f)} == set(README_LINKS)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {r["link"] for r in rows} == set(README_LINKS)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["meta"]["bytes_png"] == "bytes.png"
    for s in doc["links"]:
        assert s["link"] in README_LINKS and (tmp_path / s["latency_png"]).is_file()
        measured = [r for r in rows if r["link"] == s["link"] and r["measured"]]
        assert len(s["prediction_errors"]) == len(measured)
        assert 0 <= s["prediction_error_median"] <= s["prediction_error_max"]
        assert "all_cloud_raw" in s["baseline_prediction_errors"]
        assert s["regret"] >= 1.0
    assert out.stdout.count("pred err median") == len(README_LINKS)
    assert " max " in out.stdout and "all_cloud_raw" in out.stdout.split("baselines:")[1]
