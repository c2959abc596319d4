"""Wall-clock time of a whole Flickr30K-sized evaluation at paper size: 1,000 images x 5,000 captions, per-item
encoding included, scored with `scoring.score_matrix` (bf16 by default, then the float32 re-scoring of the top 20
of every query, timed apart).

    python benchmarks/full_evaluation.py [--images 1000 --texts 5000 --dtype bf16|fp32 --refine_k 20 --compile]

The model has random weights (speed does not depend on them); captions follow Flickr30K's length distribution.
"""

import argparse
import time
import warnings

import numpy as np
import torch

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.scoring import encode_images, encode_texts, refine_top_k, score_matrix

from scoring import flickr_lengths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--num_regions", type=int, default=36, help="regions per image (BUTD: 36)")
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--refine_k", type=int, default=20, help="bf16 only: float32 re-scoring of each query's top k")
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-pair part (compile time counts)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*boxes.*")
    torch.manual_seed(0)
    config = MPSMConfig()
    model = MPSMModel(config).eval()
    lengths = flickr_lengths(args.texts, np.random.default_rng(0))
    input_ids = torch.zeros(args.texts, int(lengths.max()), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(4, config.vocab_size, (length,))
    corners = torch.rand(args.images, args.num_regions, 2) * 0.6
    boxes = torch.cat([corners, corners + 0.3], -1)
    features = torch.randn(args.images, args.num_regions, config.img_dim).relu()

    started = time.perf_counter()
    with torch.no_grad():
        images = encode_images(model, [{"region_features": features[i : i + 50], "boxes": boxes[i : i + 50]}
                                       for i in range(0, args.images, 50)], progress=False)
        texts = encode_texts(model, [{"input_ids": input_ids[i : i + 128]} for i in range(0, args.texts, 128)],
                             progress=False)
    encoded = time.perf_counter()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    scores = score_matrix(model, images, texts, dtype=dtype, refine_k=0, compile=args.compile)
    scored = time.perf_counter()
    if dtype is not None and args.refine_k:
        scores = refine_top_k(model, images, texts, scores, args.refine_k)
    finished = time.perf_counter()
    assert scores.shape == (args.images, args.texts) and torch.isfinite(scores).all()
    pairs = args.images * args.texts
    print(f"{args.images} x {args.texts} at paper size, {args.dtype}{' compiled' if args.compile else ''}: encoding "
          f"{encoded - started:.0f} s, scoring {scored - encoded:.0f} s ({pairs / (scored - encoded):.0f} pairs/s), "
          f"fp32 re-scoring of the top {args.refine_k if dtype is not None else 0} {finished - scored:.0f} s, "
          f"total {(finished - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
