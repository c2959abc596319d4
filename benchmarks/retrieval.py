"""Two-stage retrieval (global-embedding first stage + MPSM re-ranking) against exhaustive MPSM scoring.

    python benchmarks/retrieval.py                      # galleries of 1K, 5K and 25K images, 50 caption queries
    python benchmarks/retrieval.py --sizes 1000 --queries 50 --train_seconds 20   # quick

The model is small (embed 128, sim 32, 8 regions of 64 features, 3 KGID layers, 3 SRGR rounds): exhaustive scoring of
25K images at paper size would take hours on a CPU. It is trained for `--train_seconds` on synthetic matched data with
the triplet loss plus the global contrastive loss (`global_loss_weight`), which trains the first stage. Each image
shows 4 of 100 concepts (a feature direction each, plus noise) among 4 distractor regions; its caption names the 4
concepts in random order between filler words. Queries are captions of gallery images (text -> image retrieval).
"""

import argparse
import time
import warnings

import numpy as np
import torch

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.retrieval import MPSMIndex, global_embeddings, rerank
from modeling_mpsm.scoring import encode_images, encode_texts, score_matrix
from modeling_mpsm.training import set_loss_mode


NUM_CONCEPTS, CONCEPTS_PER_IMAGE, NUM_REGIONS, FEATURE_DIM, NUM_FILLERS = 100, 4, 8, 64, 20
START, END, FIRST_WORD = 1, 2, 3
WARMUP_STEPS = 201  # updates 0-200 sum the violations, later ones take the hardest negatives


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 25000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--rerank_k", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--train_seconds", type=float, default=60)
    parser.add_argument("--global_loss_weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class SyntheticWorld:
    """Images of 4 concepts among distractors, and captions naming them."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.concepts = self.rng.standard_normal((NUM_CONCEPTS, FEATURE_DIM)).astype(np.float32)

    def sample(self, count):
        """(region_features [count, 8, 64], boxes [count, 8, 4], input_ids [count, L])."""
        rng = self.rng
        chosen = np.stack([rng.choice(NUM_CONCEPTS, CONCEPTS_PER_IMAGE, replace=False) for _ in range(count)])
        features = rng.standard_normal((count, NUM_REGIONS, FEATURE_DIM)).astype(np.float32)
        features[:, :CONCEPTS_PER_IMAGE] = self.concepts[chosen] + 0.5 * features[:, :CONCEPTS_PER_IMAGE]
        order = np.argsort(rng.random((count, NUM_REGIONS)), axis=1)  # shuffle concept and distractor regions
        features = np.take_along_axis(features, order[..., None], axis=1)
        corners = rng.random((count, NUM_REGIONS, 2)).astype(np.float32) * 0.6
        boxes = np.concatenate([corners, corners + 0.3], -1)
        captions = []
        for concepts in chosen:
            words = [FIRST_WORD + NUM_FILLERS + c for c in rng.permutation(concepts)]
            fillers = FIRST_WORD + rng.integers(0, NUM_FILLERS, rng.integers(2, 7))
            captions.append([START, *rng.permutation(np.concatenate([words, fillers])).tolist(), END])
        length = max(map(len, captions))
        input_ids = np.zeros((count, length), dtype=np.int64)
        for row, caption in enumerate(captions):
            input_ids[row, : len(caption)] = caption
        return torch.from_numpy(features), torch.from_numpy(boxes), torch.from_numpy(input_ids)


def train(model, world, seconds, batch_size=32):
    """Adam on the MPSM loss (triplet + global contrastive) for `seconds`; returns the number of steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        features, boxes, input_ids = world.sample(batch_size)
        set_loss_mode(model, steps, WARMUP_STEPS)  # as the training loop does: the loss owns its mode
        loss = model(input_ids=input_ids, region_features=features, boxes=boxes, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        steps += 1
    return model.eval(), steps


def recall(rankings, targets, ks=(1, 5, 10)):
    """R@K in % of [Q, >= K] rankings of gallery positions against the true position of each query."""
    hits = rankings == targets[:, None]
    return {k: 100 * hits[:, :k].any(1).float().mean().item() for k in ks}


def overlap(rankings, exhaustive, k=10):
    """Share (%) of the exhaustive top k that `rankings` [Q, >= k] also has in its top k."""
    shared = [len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(rankings, exhaustive)]
    return 100 * sum(shared) / (k * len(shared))


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*boxes.*")
    torch.manual_seed(args.seed)
    world = SyntheticWorld(args.seed)
    config = MPSMConfig(img_dim=FEATURE_DIM, vocab_size=FIRST_WORD + NUM_FILLERS + NUM_CONCEPTS,
                        word_dim=64, embed_size=128, sim_dim=32, global_loss_weight=args.global_loss_weight)
    model, steps = train(MPSMModel(config), world, args.train_seconds)
    print(f"model: embed {config.embed_size}, sim {config.sim_dim}, {NUM_REGIONS} regions x {FEATURE_DIM}; trained "
          f"{steps} steps in {args.train_seconds:.0f} s (global_loss_weight {args.global_loss_weight})")

    features, boxes, input_ids = world.sample(max(args.sizes))
    with torch.no_grad():
        all_images = encode_images(model, [{"region_features": features[i : i + 1000], "boxes": boxes[i : i + 1000]}
                                           for i in range(0, len(features), 1000)], progress=False)
    targets = torch.arange(args.queries) * (min(args.sizes) // args.queries)  # query q describes gallery image targets[q]
    queries = encode_texts(model, [{"input_ids": input_ids[targets]}], progress=False)
    header = (f"{'gallery':>8} {'method':>22} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'=exh@10':>8} {'time (s)':>9} "
              f"{'pair evals':>11}")
    print(header)
    for size in args.sizes:
        gallery = MPSMIndex(all_images.select(slice(0, size)))
        start = time.perf_counter()
        scores = score_matrix(model, gallery.cache, queries, progress=False)
        seconds = time.perf_counter() - start
        exhaustive = scores.T.argsort(1, descending=True)
        row = recall(exhaustive, targets)
        print(f"{size:8d} {'exhaustive':>22} {row[1]:6.1f} {row[5]:6.1f} {row[10]:6.1f} {100.0:8.1f} {seconds:9.2f} "
              f"{args.queries * size:11d}")
        start = time.perf_counter()
        _, first_stage = gallery.search(global_embeddings(queries), 10)
        seconds = time.perf_counter() - start
        row = recall(first_stage, targets)
        print(f"{size:8d} {'first stage only':>22} {row[1]:6.1f} {row[5]:6.1f} {row[10]:6.1f} "
              f"{overlap(first_stage, exhaustive):8.1f} {seconds:9.2f} {0:11d}")
        for rerank_k in args.rerank_k:
            start = time.perf_counter()
            _, indices = rerank(model, queries, gallery, k=10, rerank_k=rerank_k)
            seconds = time.perf_counter() - start
            row = recall(indices, targets)
            print(f"{size:8d} {f'two-stage, rerank {rerank_k}':>22} {row[1]:6.1f} {row[5]:6.1f} {row[10]:6.1f} "
                  f"{overlap(indices, exhaustive):8.1f} {seconds:9.2f} {args.queries * rerank_k:11d}")


if __name__ == "__main__":
    main()
