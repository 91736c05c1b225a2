"""bench/attacks.py writes BENCHMARKS.md through bench/_common.py's one section writer: a
section written again replaces itself in place, under the markers BENCHMARKS.md already has."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def attacks(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # bench/attacks.py prepends bench/
    return importlib.import_module("bench.attacks")


def _outside(text: str, start: str, end: str) -> tuple[str, str]:
    head, rest = text.split(start, 1)
    return head, rest.split(end, 1)[1].lstrip("\n")


def test_attacks_section_written_twice_is_one_section_and_others_stay(attacks, tmp_path):
    cpu_start, cpu_end = attacks.section_markers("cpu")
    gpu_start, gpu_end = attacks.section_markers("gpu")
    others = (
        "# Benchmarks\n\nIntro.\n\n"
        f"{gpu_start}\n## Attacks (GPU)\n\ngpu table\n{gpu_end}\n\n"
        "<!-- bench/load.py paced: start -->\n## Load\n\nload table\n"
        "<!-- bench/load.py paced: end -->\n\n## Hand-written notes\n\nkept.\n"
    )
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(others)
    attacks.write_section(path, "cpu", "## Attacks (CPU)\n\nfirst run\n")
    attacks.write_section(path, "cpu", "## Attacks (CPU)\n\nsecond run\n")
    text = path.read_text()
    assert text.count(cpu_start) == text.count(cpu_end) == 1
    assert "second run" in text and "first run" not in text
    assert text.replace(
        f"\n\n{cpu_start}\n## Attacks (CPU)\n\nsecond run\n{cpu_end}\n", "\n") == others
    # rewriting a section in the middle of the file leaves the rest byte for byte
    attacks.write_section(path, "gpu", "## Attacks (GPU)\n\nnew gpu table")
    after = path.read_text()
    assert after.count(gpu_start) == 1 and "new gpu table" in after and "\ngpu table\n" not in after
    assert _outside(after, gpu_start, gpu_end) == _outside(text, gpu_start, gpu_end)


def test_attacks_markers_are_the_ones_benchmarks_md_has(attacks, tmp_path):
    real = (ROOT / "BENCHMARKS.md").read_text()
    keys = re.findall(r"<!-- bench/attacks\.py (\S+): start -->", real)
    assert keys, "BENCHMARKS.md has no bench/attacks.py section"
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(real)
    for key in keys:
        start, end = attacks.section_markers(key)
        before = path.read_text()
        assert before.count(start) == before.count(end) == 1, key
        attacks.write_section(path, key, f"## Attacks ({key})\n\nrewritten")
        after = path.read_text()
        assert after.count(start) == after.count(end) == 1, key  # replaced in place
        assert _outside(after, start, end) == _outside(before, start, end), key
        assert f"{start}\n## Attacks ({key})\n\nrewritten\n{end}" in after
