"""Micro-benchmarks of the core: coreset selection and nearest-neighbour search, on real features.

Prints two tables:

1. greedy k-center coreset: plain vs two-stage (composable), time and k-center coverage radius
   (max and mean distance of every patch to its nearest coreset point; lower is better).
2. 1-NN search of one image's patches (40 x 40 = 1600 queries) in memory banks of several sizes:
   torch chunked matmul vs faiss IndexFlatL2, ms per image.

Usage: python benchmarks/core.py --data ../shared/data [--category transistor] [--images 213]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def coverage(x: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    from anomalens.knn import NearestNeighbours

    d, _ = NearestNeighbours(x[idx]).search(x, 1)
    return float(d.max()), float(d.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--category", default="transistor")
    ap.add_argument("--images", type=int, default=213)
    ap.add_argument("--image-size", type=int, default=320)
    args = ap.parse_args()

    from anomalens import PatchCore
    from anomalens.data import MVTecCategory
    from anomalens.io import read_image
    from anomalens.knn import NearestNeighbours
    from anomalens.sampler import greedy_coreset

    cat = MVTecCategory(Path(args.data) / "mvtec_ad" / args.category)
    det = PatchCore(image_size=args.image_size)
    paths = cat.train_paths()[: args.images]
    feats = torch.stack([f for i in range(0, len(paths), 8) for f in det.extract([read_image(p) for p in paths[i : i + 8]])[0]])
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()
    print(f"{len(paths)} images of {cat.name} at {args.image_size}px -> {x.shape[0]} patches x {x.shape[1]} dims\n")

    print("| coreset | ratio | projection | seconds | coverage max | coverage mean |")
    print("|---|---|---|---|---|---|")
    for ratio in (0.01, 0.1):
        n = int(ratio * x.shape[0])
        for two in (False, True):
            if ratio == 0.1 and not two:
                continue  # plain greedy at 10% takes many minutes; see README
            t = time.perf_counter()
            idx = greedy_coreset(x, n, projection_dim=128, two_stage=two)
            s = time.perf_counter() - t
            cmax, cmean = coverage(x, idx)
            print(f"| {'two-stage' if two else 'plain greedy'} | {ratio:.0%} | 128 | {s:.1f} | {cmax:.2f} | {cmean:.2f} |")
    g = torch.Generator().manual_seed(0)
    r = torch.randperm(x.shape[0], generator=g)[: int(0.01 * x.shape[0])]
    cmax, cmean = coverage(x, r)
    print(f"| random subset | 1% | - | 0.0 | {cmax:.2f} | {cmean:.2f} |")

    print("\n| bank size | torch ms/image | faiss ms/image |")
    print("|---|---|---|")
    q = x[: feats.shape[2] * feats.shape[3]]
    for m in (1000, 3400, 10000, 34000):
        bank = x[torch.randperm(x.shape[0], generator=g)[:m]]
        row = []
        for backend in ("torch", "faiss"):
            nn = NearestNeighbours(bank, backend)
            nn.search(q, 1)
            t = time.perf_counter()
            for _ in range(10):
                nn.search(q, 1)
            row.append((time.perf_counter() - t) / 10 * 1e3)
        print(f"| {m} | {row[0]:.1f} | {row[1]:.1f} |")


if __name__ == "__main__":
    main()
