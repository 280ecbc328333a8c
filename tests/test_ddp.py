"""Training on several processes: real Lightning DDP (``strategy="ddp"``, gloo, 2 CPU processes, see
``tests/ddp_step.py``). The PCME++ loss over all-gathered embeddings and the gradients of one step with
2 x B samples equal one process with 2B samples within 1e-5; metadata dropout stays exact per rank
with each rank drawing its own items."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(world: int, out: Path, tokenizer: Path, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_step.py"), "--world", str(world), "--tokenizer",
                        str(tokenizer), "--out", str(out), *extra], capture_output=True, text=True, env=env,
                       timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [torch.load(out / f"rank{i}.pt") for i in range(world)]
    assert all(rec["world"] == world for rec in recs)
    return recs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("ddp")
    return {1: _run(1, d / "one", tokenizer_dir), 2: _run(2, d / "two", tokenizer_dir)}


def test_two_processes_equal_one_process_with_the_whole_batch(runs):
    (one,), (r0, r1) = runs[1], runs[2]
    assert abs(one["loss"] - r0["loss"]) < 1e-5 and r0["loss"] == r1["loss"]
    assert set(one["grads"]) == set(r0["grads"]) and len(one["grads"]) > 100
    worst = max((one["grads"][k] - r0["grads"][k]).abs().max().item() for k in one["grads"])
    assert worst < 1e-5, worst
    assert all(torch.equal(r0["grads"][k], r1["grads"][k]) for k in r0["grads"])  # DDP synced them
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-3  # a step that learns something


def test_metadata_dropout_exact_per_rank_and_ranks_differ(tmp_path, tokenizer_dir):
    r0, r1 = _run(2, tmp_path, tokenizer_dir, "--droprate", "0.5", "--batch", "8")
    (d0,), (d1,) = r0["drops"], r1["drops"]
    assert set(d0) == set(d1) and len(d0) >= 4
    for name in d0:  # int(0.5 * 4) items dropped per item type on each rank (valid ones before)
        assert (~d0[name]).sum() >= 2 and (~d1[name]).sum() >= 2, name
    assert any(not torch.equal(d0[n], d1[n]) for n in d0)  # each rank draws its own
