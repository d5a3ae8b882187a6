"""Memorisation audit throughput, and how its time grows with the training set.

    python -m benchmarks.bench_memorisation [--bundle models/demo] [--queries 200]
                                            [--sizes 1000 3000 10000 30000 100000]

1. Throughput on a real bundle: ``--queries`` images from its generator audited against an index of
   1,000 others (embedding, then the kNN search and the pixel check), images/s per stage.
2. Scaling: the same queries' search and pixel check against indexes of N = ``--sizes`` training
   images, with random unit embeddings of the bundle's dimension and random 64² thumbnails (what
   the data is does not change the cost). The log-log slope of time against N says how it grows:
   1 is linear (each query is a BLAS pass over the embeddings), 2 would be all pairs of a set
   growing with N. The pixel check costs the same per query whatever N (``neighbours`` candidates).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.bundle import load_bundle
from service.nearcopy import DEFAULT_COMPARE_SIZE, NearCopyIndex, embed_images


def generated(bundle, count: int, seed: int) -> np.ndarray:
    """``count`` generator images [count, H, W] in [-1, 1] from standard normal latents."""
    z = np.random.default_rng(seed).standard_normal((count, bundle.manifest.latent_dim)).astype(np.float32)
    return np.concatenate([bundle.generate(z[i:i + 64])[:, 0] for i in range(0, count, 64)])


def embed(bundle, images: np.ndarray) -> np.ndarray:
    return np.concatenate([embed_images(bundle, images[i:i + 64]) for i in range(0, len(images), 64)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000])
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    sha = bundle.manifest.files["classifier.onnx"].sha256
    train, queries = generated(bundle, 1000, 0), generated(bundle, args.queries, 1)
    index = NearCopyIndex.build(embed(bundle, train), train, range(len(train)), threshold=0.9, classifier_sha256=sha)
    start = time.perf_counter()
    query_embeddings = embed(bundle, queries)
    embed_s = time.perf_counter() - start
    index.match(query_embeddings, queries)
    match_s = time.perf_counter() - start - embed_s
    print(f"bundle {bundle.manifest.name} {bundle.manifest.resolution}², embedding {query_embeddings.shape[1]}, "
          f"{args.queries} queries against 1,000 training images")
    print("| stage | images/s |\n|---|---|")
    print(f"| embedding (classifier.onnx) | {args.queries / embed_s:.1f} |")
    print(f"| kNN + pixel check | {args.queries / match_s:.1f} |")
    print(f"| audit (both) | {args.queries / (embed_s + match_s):.1f} |")

    rng = np.random.default_rng(2)
    dimension, size = query_embeddings.shape[1], DEFAULT_COMPARE_SIZE
    query_thumbs = rng.uniform(-1, 1, (args.queries, size, size)).astype(np.float32)
    rows = []
    for count in args.sizes:
        embeddings = rng.standard_normal((count, dimension)).astype(np.float32)
        thumbs = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        start = time.perf_counter()
        scaled = NearCopyIndex(embeddings, thumbs, np.arange(count).astype(str),
                               {**index.metadata, "image_size": size, "compare_size": size})
        built = time.perf_counter()
        scaled._search.kneighbors(query_embeddings)
        searched = time.perf_counter()
        scaled.match(query_embeddings, query_thumbs)
        rows.append((count, built - start, searched - built, time.perf_counter() - searched))
    print(f"\n{args.queries} queries, random embeddings ({dimension}) and {size}² thumbnails")
    print("| training images | index build s | kNN s | kNN + pixel check s | images/s |\n|---|---|---|---|---|")
    for count, build_s, search_s, match_s in rows:
        print(f"| {count:,} | {build_s:.2f} | {search_s:.2f} | {match_s:.2f} | {args.queries / match_s:.0f} |")
    sizes = np.log([row[0] for row in rows])
    slope = np.polyfit(sizes, np.log([row[3] for row in rows]), 1)[0]
    knn_slope = np.polyfit(sizes, np.log([row[2] for row in rows]), 1)[0]
    print(f"\nlog-log slope of time against training images: audit {slope:.2f}, kNN alone {knn_slope:.2f} "
          "(1 = linear, 2 = quadratic)")


if __name__ == "__main__":
    main()
