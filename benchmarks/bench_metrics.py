"""retrieval_metrics against the reference way, in the same run, on the same data.

Reference: the full similarity matrix (float64 csd / float32 cosine, ``psm_mapping.model.heads``)
then a per-row pandas ``rank(ascending=False)`` loop, as the authors' ``get_retrevial_metrics``.
Asserts identical ranks, R@10% and median rank; prints the speed-up (goal >= 10x).

    python benchmarks/bench_metrics.py [--sizes 5000 20000] [--dim 512] [--threads 1] [--large 100000]
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psm_mapping.model.heads import ProbEmbedding, cosine, csd  # noqa: E402
from psm_mapping.train import retrieval_metrics  # noqa: E402


def make_data(n: int, d: int, prob: bool, seed: int = 0) -> tuple[ProbEmbedding, ProbEmbedding]:
    """Correlated query/gallery pairs (median rank far from 1 and from N/2), 1% duplicate gallery items."""
    g = torch.Generator().manual_seed(seed)
    gal = torch.randn(n, d, generator=g)
    qry = 0.15 * gal + torch.randn(n, d, generator=g) / np.sqrt(1.0)
    glv = (torch.randn(n, d, generator=g) * 0.3 - 4.0) if prob else None
    qlv = (torch.randn(n, d, generator=g) * 0.3 - 4.0) if prob else None
    src, dst = torch.randperm(n, generator=g)[: n // 100], torch.randperm(n, generator=g)[: n // 100]
    gal[dst] = gal[src]
    if prob:
        glv[dst] = glv[src]
    return ProbEmbedding.from_heads(qry, qlv), ProbEmbedding.from_heads(gal, glv)


def reference(q: ProbEmbedding, g: ProbEmbedding, similarity: str, recall_at: float = 10):
    s = (csd(q, g) if similarity == "csd" else cosine(q, g)).numpy()
    n = s.shape[0]
    ranks = []
    for i in range(n):
        tmp = pd.DataFrame({"dist": s[i, :]})
        tmp["rank"] = tmp.dist.rank(ascending=False)
        ranks.append(tmp.iloc[i]["rank"])
    df = pd.DataFrame({"rank": ranks})
    return np.asarray(ranks), float((df["rank"] < recall_at / 100 * n).mean()), float(df["rank"].median())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[5000, 20000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--similarity", nargs="+", default=["csd", "cosine"])
    ap.add_argument("--large", type=int, default=0, help="also time ours alone at this N (e.g. 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="ours: best of this many runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="N = 200, one repeat (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeat, args.large = [200], 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dim {args.dim}")
    print("ref: one run; ours: best of --repeat; mm s: one float32 N x N product alone (the floor for ours);")
    print("settled: pairs decided in float64")
    print(f"{'sim':7s} {'N':>7s} {'ref s':>8s} {'ours s':>8s} {'mm s':>7s} {'speed-up':>9s} {'R@10%':>8s} {'median':>8s} {'settled':>9s}")
    for sim in args.similarity:
        for n in args.sizes:
            q, g = make_data(n, args.dim, prob=sim == "csd")
            t0 = time.perf_counter()
            r_ranks, r_rec, r_med = reference(q, g, sim)
            t_ref = time.perf_counter() - t0
            t_ours = math.inf
            for _ in range(args.repeat):  # best of: the machine may be shared
                t0 = time.perf_counter()
                m = retrieval_metrics(q, g, similarity=sim)
                t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            _ = q.mean @ g.mean.T
            t_mm = time.perf_counter() - t0
            del _
            np.testing.assert_array_equal(m.ranks, r_ranks)
            assert (m.recall, m.median_rank) == (r_rec, r_med), (m, r_rec, r_med)
            assert (m.ranks % 1 == 0.5).any(), "no ties in the data"
            print(
                f"{sim:7s} {n:7d} {t_ref:8.2f} {t_ours:8.3f} {t_mm:7.3f} {t_ref / t_ours:8.1f}x "
                f"{m.recall:8.4f} {m.median_rank:8.1f} {m.n_settled:9d}  identical"
            )
    if args.large:
        for sim in args.similarity:
            q, g = make_data(args.large, args.dim, prob=sim == "csd")
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            t0 = time.perf_counter()
            m = retrieval_metrics(q, g, similarity=sim, return_ranks=False, progress=True)
            t = time.perf_counter() - t0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{sim:7s} N={args.large}: ours {t:.1f} s, R@10% {m.recall:.4f}, median {m.median_rank}, "
                  f"peak RSS {rss:.0f} MiB (before: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
