"""bench.report draws the docs' plots from saved JSON alone (no benchmark runs): the recorded runs of
bench/results/, or a fresh run's file in their place."""

from __future__ import annotations

import json
import struct

from bench import report


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_plots_are_drawn_from_the_recorded_json(tmp_path):
    written = report.draw(tmp_path / "no-runs", tmp_path)
    assert [p.name for p in written] == ["bench-load.png", "bench-decode.png", "bench-length.png"]
    for path in written:
        width, height = png_size(path)
        assert width >= 600 and height >= 400


def test_a_fresh_run_is_drawn_instead_of_the_recorded_one(tmp_path):
    fresh = {"meta": {"machine": "test CPU", "date": "2026-01-01", "command": "python -m bench.load", "note": ""},
             "rounds": {"batched": [{"concurrency": 1, "tok_s": 5.0}, {"concurrency": 2, "tok_s": 9.0}],
                        "single": [{"concurrency": 1, "tok_s": 5.0}, {"concurrency": 2, "tok_s": 5.0}]}}
    (tmp_path / "load.json").write_text(json.dumps(fresh))
    assert report.source("load", tmp_path) == tmp_path / "load.json"
    assert report.source("decode", tmp_path) == report.RECORDED / "decode.json"
    report.draw(tmp_path, tmp_path)
    assert png_size(tmp_path / "bench-load.png")[0] >= 600


def test_the_machine_names_the_cpu_model():
    text = report.machine()
    assert "CPUs" in text
    cpuinfo = open("/proc/cpuinfo").read()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert model in text
