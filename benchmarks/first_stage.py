"""First stage of two-stage retrieval at scale: exact (flat) search against faiss IVF-Flat in `MPSMIndex`.

    nice -n 10 python benchmarks/first_stage.py                       # 1,000,000 x 1024, 1000 queries
    python benchmarks/first_stage.py --size 100000                    # quick
    python benchmarks/first_stage.py --embeddings gallery.npy         # your own [N, d] global embeddings

Every figure is measured in this run against exact search over the same gallery, through the package's `MPSMIndex`
(exact: `faiss.knn`, BLAS over the whole gallery, no build step): build time (IVF: k-means on min(N, 64 * nlist)
sampled items + assigning every item), latency per query of one batch of `--queries`
queries (best of `--repeats`), its speed-up over exact search, and recall@k: the share of the exact top k (k = 100,
the re-ranking depth of `rerank_k=100`) that the approximate top k holds.

The synthetic gallery imitates how learned global embeddings are distributed: not uniform on the sphere (there, the
nearest neighbours are no nearer than any other item and no index can beat a scan), but clustered at two levels with
heavy-tailed cluster sizes. N / 1000 topics are random unit directions; N / 100 concepts each belong to a random
topic, at cosine ~0.82 from it (concepts of one topic at ~0.67 from each other); items pick a concept with
log-normal (sigma 1) weights, so a few concepts hold thousands of items and many hold a handful, and sit at cosine
~0.86 from it (random noise of norm 0.6, then L2 normalisation). Queries are gallery items perturbed the same way
(noise 0.5: cosine ~0.89 to their source), standing in for the other modality's embedding of a matching pair. The
exact top 100 of a query is then mostly its concept's items, and then items of sibling concepts — the structure
that an inverted file exploits. How well that holds for a trained model's embeddings has to be measured
on them (`--embeddings`): recall at a given nprobe depends on the data, the speed-up mostly on the share scanned.
"""

import argparse
import math
import os
import time

import numpy as np
import torch

from modeling_mpsm.modeling_mpsm import MPSMImageOutput
from modeling_mpsm.retrieval import DEFAULT_NPROBE, MPSMIndex

try:
    import faiss
except ImportError:
    faiss = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="Gallery items (synthetic).")
    parser.add_argument("--dim", type=int, default=1024, help="Embedding dimension (the paper's embed_size: 1024).")
    parser.add_argument("--embeddings", help=".npy file of [N, d] gallery embeddings instead of the synthetic ones.")
    parser.add_argument("--queries", type=int, default=1000, help="Queries, searched as one batch.")
    parser.add_argument("--k", type=int, default=100, help="Results per query; recall is of the exact top k.")
    parser.add_argument("--nlist", type=int, help="IVF lists; default MPSMIndex's 4 * sqrt(N).")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3, help="Timed searches per setting; the best is kept.")
    parser.add_argument("--recall_target", type=float, default=0.95)
    parser.add_argument("--speedup_target", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def unit(array):
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


def noise(rng, rows, dim, norm):
    """`rows` random directions of norm `norm` (isotropic Gaussian, normalised)."""
    return norm * unit(rng.standard_normal((rows, dim), dtype=np.float32))


def synthetic_gallery(size, dim, rng, chunk=65536):
    """(embeddings [size, dim] float32, L2-normalised; concept of each item [size]; topic of each concept)."""
    num_topics, num_concepts = max(1, size // 1000), max(1, size // 100)
    topics = unit(rng.standard_normal((num_topics, dim), dtype=np.float32))
    concept_topic = rng.integers(0, num_topics, num_concepts)
    concepts = unit(topics[concept_topic] + noise(rng, num_concepts, dim, 0.7))
    weights = rng.lognormal(0.0, 1.0, num_concepts)
    item_concept = rng.choice(num_concepts, size, p=weights / weights.sum())
    embeddings = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, chunk):  # in place, chunk by chunk: one copy of the gallery in memory
        stop = min(size, start + chunk)
        embeddings[start:stop] = unit(concepts[item_concept[start:stop]] + noise(rng, stop - start, dim, 0.6))
    return embeddings, item_concept, concept_topic


def best_time(function, repeats):
    """(best wall time in s of `repeats` calls, the last result)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def recall(found, exact):
    """Share of each query's exact top k ([Q, k] ids) found in the approximate top k, averaged."""
    return float(np.mean([len(np.intersect1d(a, b, assume_unique=True)) / len(b) for a, b in zip(found, exact)]))


def main(argv=None):
    args = parse_args(argv)
    if faiss is None:
        raise SystemExit("this benchmark needs faiss: pip install faiss-cpu")
    rng = np.random.default_rng(args.seed)
    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP "
          f"threads, torch {torch.__version__} with {torch.get_num_threads()} threads; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    start = time.perf_counter()
    if args.embeddings:
        embeddings = unit(np.load(args.embeddings).astype(np.float32))
        structure = None
        print(f"gallery: {args.embeddings}, {embeddings.shape[0]} x {embeddings.shape[1]}")
    else:
        embeddings, item_concept, concept_topic = synthetic_gallery(args.size, args.dim, rng)
        structure = (item_concept, concept_topic)
        print(f"gallery: synthetic, {args.size} x {args.dim}, {args.size // 1000} topics, {args.size // 100} "
              f"concepts (generated in {time.perf_counter() - start:.0f} s)")
    size, dim = embeddings.shape
    sources = rng.choice(size, args.queries, replace=False)
    queries = torch.from_numpy(unit(embeddings[sources] + noise(rng, args.queries, dim, 0.5)))
    # The gallery as an image cache of global embeddings only (one "region" per item, for the item count).
    cache = MPSMImageOutput(image_embeds=torch.from_numpy(embeddings),
                            region_mask=torch.ones(size, 1, dtype=torch.bool))

    rows = []  # (method, setting, build s, s per batch, recall, self@1)

    def add_row(method, setting, build, seconds, ids):
        rows.append((method, setting, build, seconds, recall(ids, exact_ids), float(np.mean(ids[:, 0] == sources))))

    flat = MPSMIndex(cache)
    exact_seconds, (exact_scores, exact_ids) = best_time(lambda: flat.search(queries, args.k), args.repeats)
    exact_ids = exact_ids.numpy()
    add_row("exact (flat)", "", 0.0, exact_seconds, exact_ids)
    del flat  # one copy of the embeddings per index: free it before the next
    if structure is not None:
        item_concept, concept_topic = structure
        same_concept = np.mean(item_concept[exact_ids] == item_concept[sources][:, None])
        same_topic = np.mean(concept_topic[item_concept[exact_ids]] == concept_topic[item_concept[sources]][:, None])
        print(f"exact top {args.k}: {100 * same_concept:.1f} % of the query's concept, {100 * same_topic:.1f} % of its "
              f"topic; mean score of rank 1 {exact_scores[:, 0].mean():.3f}, of rank {args.k} "
              f"{exact_scores[:, -1].mean():.3f}")

    index = MPSMIndex(cache, first_stage="ivf", nlist=args.nlist)
    build, _ = best_time(index.build, 1)
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        seconds, (_, ids) = best_time(lambda: index.search(queries, args.k), args.repeats)
        add_row("ivf", f"nlist {index.nlist}, nprobe {nprobe}", build, seconds, ids.numpy())

    print(f"\n{args.queries} queries in one batch, top {args.k}; exact search measured in this run is the baseline")
    print(f"{'method':>12} {'setting':>26} {'build (s)':>10} {'ms/query':>9} {'speed-up':>9} "
          f"{f'recall@{args.k}':>11} {'self@1':>7}")
    chosen = None
    for method, setting, build, seconds, found, self_at_1 in rows:
        print(f"{method:>12} {setting:>26} {build:10.1f} {1000 * seconds / args.queries:9.3f} "
              f"{exact_seconds / seconds:8.1f}x {100 * found:10.1f}% {100 * self_at_1:6.1f}%")
        if method != "exact (flat)" and found >= args.recall_target and exact_seconds / seconds >= args.speedup_target:
            chosen = chosen or setting  # rows go from the cheapest setting up
    if chosen:
        print(f"ivf: the cheapest setting with recall@{args.k} >= {100 * args.recall_target:.0f} % and "
              f">= {args.speedup_target:.0f}x less latency than exact: {chosen}")
    else:
        print(f"ivf: no setting reached recall@{args.k} >= {100 * args.recall_target:.0f} % with "
              f">= {args.speedup_target:.0f}x less latency than exact")
    print(f"MPSMIndex's default nprobe: {DEFAULT_NPROBE}; load average at the end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
