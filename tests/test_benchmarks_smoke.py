"""Benchmarks cannot rot: every ``benchmarks/bench_*.py`` runs at its ``--smoke`` size as a real
subprocess, exits 0 and prints its numbers (a number with a unit: ms, s, x, %, GB, px/s, ...; or
a JSON object of results with a number in it).

Parametrised over the glob, so a new benchmark is covered the moment it lands (and must have a
``--smoke`` flag). Sizes are the benchmarks' own ``--smoke`` sizes: seconds each.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted((REPO / "benchmarks").glob("bench_*.py"))
#: a measured number followed by its unit ("12.3 ms", "1.6x", "45 %", "0.59 GB", "120 chips/s")
NUMBER = re.compile(r"\d(?:[\d,]*)(?:\.\d+)?\s?(?:ms|s|x|%|[KMG]i?B|[A-Za-z]+/s)(?![A-Za-z])")


def test_benchmarks_found():
    assert len(BENCHES) >= 5, BENCHES


@pytest.mark.parametrize("bench", BENCHES, ids=[b.stem for b in BENCHES])
def test_benchmark_smoke(bench: Path, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["TOKENIZERS_PARALLELISM"] = "false"
    p = subprocess.run([sys.executable, str(bench), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    tail = (p.stdout[-3000:] + "\n--- stderr ---\n" + p.stderr[-3000:])
    assert p.returncode == 0, f"{bench.name} --smoke exited {p.returncode}:\n{tail}"
    assert NUMBER.search(p.stdout) or any(_json_numbers(line) for line in p.stdout.splitlines()), \
        f"{bench.name} --smoke printed no measured number:\n{tail}"
    assert "Traceback" not in p.stderr, tail


def _json_numbers(line: str) -> bool:
    """True when ``line`` is a JSON object holding a (non-boolean) number."""
    try:
        d = json.loads(line)
    except ValueError:
        return False
    return isinstance(d, dict) and any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
