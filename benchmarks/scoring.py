"""Throughput of MPSM's exhaustive scoring: the SGRAF scheme against `modeling_mpsm.scoring.score_matrix`.

    python benchmarks/scoring.py            # paper size: embed 1024, sim 256, 36 regions, vocab 8481
    python benchmarks/scoring.py --quick    # smaller model and matrix, for a smoke run

Captions follow Flickr30K's length distribution (log-normal words, mean ~12.5, +<start>/<end>); the model is randomly
initialised (speed does not depend on the weights). Reported: pairs/s of (a) the SGRAF scheme (100 x 100 shards, a
Python loop over captions, each caption scored against the shard's 100 images) and (b) the package path (length-bucketed
blocks, eager and `torch.compile`, fp32 and bf16), FLOPs per pair (torch.utils.flop_counter), achieved GFLOP/s
against a 2048² matmul peak measured in the same run, peak RSS, the projected time of a 1000 x 5000 evaluation, and the
agreement of bf16 with fp32 scores, before and after the float32 re-scoring of the bf16 top k of every query
(`scoring.refine_top_k`, on by default in `score_matrix` with a reduced dtype; timed separately).
"""

import argparse
import math
import resource
import time
import warnings

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.scoring import (
    choose_scoring_dtype,
    encode_images,
    encode_texts,
    refine_top_k,
    score_matrix,
)


@register_flop_formula(torch.ops.aten.addmm_)
def addmm_inplace_flop(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    """The in-place accumulation of SRGR (`add_linear` without autograd) counts as the addmm it is."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="embed 256, sim 64, 40 x 100 pairs")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--num_regions", type=int, default=36, help="regions per image (BUTD: 36)")
    parser.add_argument("--texts", type=int, default=1000,
                        help="captions (the SGRAF scheme scores the first 100); a 5,000-caption evaluation groups "
                             "captions of equal length into its blocks, far fewer captions pad more")
    parser.add_argument("--refine_k", type=int, default=20, help="float32 re-scoring of the bf16 top k (0: none)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max_block_bytes", type=int, default=None, help="default: scoring.DEFAULT_MAX_BLOCK_BYTES")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--plot", help="also draw pairs/s and % of peak per method to this PNG")
    return parser.parse_args(argv)


def matmul_peak(dtype, max_size=2048, budget_s=1.0):
    """Best GFLOP/s of a square matmul: the size doubles from 256 while one product takes under 50 ms (up to
    `max_size`), then products repeat for `budget_s`. Bounded in time on CPUs where a dtype is emulated (a 2048²
    bfloat16 product took 65 s on one 2-core machine)."""
    size = 256
    while True:
        a = torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start > 0.05 or size >= max_size:
            break
        size *= 2
    best, spent = math.inf, 0.0
    while spent < budget_s or best == math.inf:
        start = time.perf_counter()
        a @ a
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best / 1e9


def flickr_lengths(count, rng):
    """Token counts of captions with Flickr30K's word-count distribution (log-normal, mean 12.5, sd 5), +2."""
    sigma = math.sqrt(math.log(1 + (5 / 12.5) ** 2))
    words = rng.lognormal(math.log(12.5) - sigma**2 / 2, sigma, count)
    return np.clip(np.round(words), 3, 80).astype(int) + 2


def pair_flops(config, num_words, num_regions):
    """
    Matmul FLOPs of one pair without padding (t2i stream, one perspective, multi alignment, SRGR with the last round
    reconstructing the global node only): cross attention 4Lnd and the norms of its sums 2Ln² (a quadratic form in
    the regions' Gram matrix, which costs 2n²d per image and block, not per pair), local and global W_d 2(L+1)dm, per
    full SRGR round 14Km² + 4K²m + 4Km over K = L + 1 nodes, last round 14m² + 8Km.
    """
    d, m, L, n, K = config.embed_size, config.sim_dim, num_words, num_regions, num_words + 1
    full_round = 14 * K * m * m + 4 * K * K * m + 4 * K * m
    last_round = 14 * m * m + 8 * K * m
    return 4 * L * n * d + 2 * L * n * n + 2 * K * d * m + (config.srgr_steps - 1) * full_round + last_round


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def sgraf_scheme(model, images, texts, shard=100):
    """SGRAF's evaluation loop: 100 x 100 shards, one caption at a time against the shard's images."""
    num_images, num_texts = len(images.region_mask), len(texts.attention_mask)
    scores = torch.empty(num_images, num_texts)
    with torch.no_grad():
        for i in range(0, num_images, shard):
            for t in range(0, num_texts, shard):
                shard_images = images.select(slice(i, i + shard))
                for j in range(t, min(t + shard, num_texts)):
                    scores[i : i + shard, j] = model.similarity(shard_images, texts.select(slice(j, j + 1)))[:, 0]
    return scores


def plot(rates, percent_of_peak, path, title):
    """Bar chart of pairs/s per method (with its share of the matmul peak), against the 4x-the-SGRAF-scheme target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rates)
    figure, axis = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.6))
    bars = axis.barh(range(len(labels)), [rates[label] for label in labels],
                     color=["tab:gray" if label == "SGRAF scheme" else "tab:blue" for label in labels])
    for bar, label in zip(bars, labels):
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {rates[label]:,.0f} ({percent_of_peak[label]:.0f}% of peak)", va="center", fontsize=9)
    axis.axvline(4 * rates["SGRAF scheme"], color="black", linestyle="--", linewidth=1, label="4x the SGRAF scheme")
    axis.set_yticks(range(len(labels)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("pairs scored per second")
    axis.set_title(title, fontsize=10)
    axis.set_xlim(0, max(1.35 * max(rates.values()), 4.2 * rates["SGRAF scheme"]))
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def rank_agreement(reference, other, ks=(1, 5, 10)):
    """For each caption (column), the share of `reference`'s top-k images that `other` also ranks in its top k."""
    result = {}
    for k in ks:
        top_reference = reference.topk(k, dim=0).indices.T
        top_other = other.topk(k, dim=0).indices.T
        overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_reference, top_other)]
        result[k] = 100 * float(np.mean(overlap))
    return result


def encoded_gallery(model, num_images, num_texts, num_regions, rng):
    """Random region features and boxes, captions of Flickr30K's lengths, encoded once per item (timed)."""
    config = model.config
    lengths = flickr_lengths(num_texts, rng)
    input_ids = torch.zeros(num_texts, int(lengths.max()), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(4, config.vocab_size, (length,))
    features = torch.randn(num_images, num_regions, config.img_dim).relu()
    corners = torch.rand(num_images, num_regions, 2) * 0.6
    boxes = torch.cat([corners, corners + 0.3], -1)
    images, image_time = timed(lambda: encode_images(
        model, [{"region_features": features[i : i + 50], "boxes": boxes[i : i + 50]} for i in range(0, num_images, 50)],
        progress=False))
    texts, text_time = timed(lambda: encode_texts(
        model, [{"input_ids": input_ids[i : i + 128]} for i in range(0, num_texts, 128)], progress=False))
    print(f"captions: {lengths.mean():.1f} tokens on average (max {lengths.max()}); per-item encoding "
          f"{1000 * image_time / num_images:.2f} ms/image, {1000 * text_time / num_texts:.2f} ms/caption")
    return images, texts, lengths, image_time, text_time


def count_flops(model, images, texts, lengths, num_regions, options):
    """Useful FLOPs per pair (no padding), checked against torch's flop counter on one caption length; prints them
    beside the FLOPs executed with block padding."""
    config, num_texts = model.config, len(texts.attention_mask)
    flops_per_pair = float(np.mean([pair_flops(config, length, num_regions) for length in lengths]))
    probe = encode_texts(model, [{"input_ids": torch.randint(4, config.vocab_size, (256, int(lengths[0])))}],
                         progress=False)
    # 256 captions, run in 8 blocks of 32 (modeling_mpsm.CAPTION_BLOCKS): the Gram matrix per block is ~0.2% of it
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.similarity(images.select(slice(0, 2)), probe)
    counted = counter.get_total_flops() / (2 * len(probe.attention_mask))
    assert abs(counted / pair_flops(config, int(lengths[0]), num_regions) - 1) < 0.01, counted
    flop_images = images.select(slice(0, min(10, len(images.region_mask))))
    with FlopCounterMode(display=False) as counter:
        score_matrix(model, flop_images, texts, progress=False, **options)
    executed = counter.get_total_flops() / (len(flop_images.region_mask) * num_texts)
    print(f"FLOPs per pair (matmuls): {flops_per_pair / 1e6:.1f} M useful (analytic, = FlopCounterMode at equal "
          f"lengths), {executed / 1e6:.1f} M executed with block padding; percentages below use the useful FLOPs")
    return flops_per_pair


def report_agreement(results):
    """Each method's scores against the fp32 eager ones: the largest difference and the top-k agreement."""
    fp32 = results["fp32 eager"]
    for label, scores in results.items():
        if label == "fp32 eager":
            continue
        agreement = rank_agreement(fp32, scores)
        print(f"{label} vs fp32 eager: max |Δscore| {(scores - fp32).abs().max():.2e}; top-k agreement (t2i) "
              + ", ".join(f"R@{k} {v:.1f}%" for k, v in agreement.items()))


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*boxes.*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = MPSMConfig(embed_size=256, sim_dim=64) if args.quick else MPSMConfig()
    num_images, num_texts = (40, 100) if args.quick else (args.images, args.texts)
    model = MPSMModel(config).eval()

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"threads {args.threads}; matmul peak (2048²): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    print(f"model: embed {config.embed_size}, sim {config.sim_dim}, {args.num_regions} regions, vocab {config.vocab_size}")

    images, texts, lengths, image_time, text_time = encoded_gallery(model, num_images, num_texts, args.num_regions, rng)
    options = {} if args.max_block_bytes is None else {"max_block_bytes": args.max_block_bytes}

    flops_per_pair = count_flops(model, images, texts, lengths, args.num_regions, options)

    # Interleaved rounds, best throughput of each method: the machine may be shared, and load hits every method alike.
    sgraf_texts = texts.select(slice(0, min(100, num_texts)))
    sgraf_scheme(model, images.select(slice(0, 10)), sgraf_texts.select(slice(0, 5)))  # warm-up
    # dtype="auto" (the CLIs' default): its once-per-process probe runs here, outside the timings
    chosen, probe_seconds = timed(lambda: choose_scoring_dtype(model, images, texts))
    chosen = "bf16" if chosen == torch.bfloat16 else "fp32"
    variants = [("fp32", None, False), ("bf16", torch.bfloat16, False), ("auto", "auto", False)]
    if not args.no_compile:
        variants += [("fp32", None, True), ("bf16", torch.bfloat16, True)]
    compile_times = {}
    for name, dtype, compile in variants:
        if compile:  # compilation (and recompilations for block shapes) happens here, outside the timings
            _, compile_times[name] = timed(lambda: score_matrix(model, images, texts, dtype=dtype, refine_k=0,
                                                                compile=True, progress=False, **options))
    rss_before = peak_rss_mb()
    rates, results = {"SGRAF scheme": 0.0}, {}
    for _ in range(args.rounds):
        peak["fp32"] = max(peak["fp32"], matmul_peak(torch.float32, budget_s=0.3))
        peak["bf16"] = max(peak["bf16"], matmul_peak(torch.bfloat16, budget_s=0.3))
        reference, seconds = timed(lambda: sgraf_scheme(model, images, sgraf_texts))
        rates["SGRAF scheme"] = max(rates["SGRAF scheme"], reference.numel() / seconds)
        for name, dtype, compile in variants:
            label = f"{name} {'compiled' if compile else 'eager'}"
            scores, seconds = timed(lambda: score_matrix(model, images, texts, dtype=dtype, refine_k=0,
                                                         compile=compile, progress=False, **options))
            results[label] = scores
            rates[label] = max(rates.get(label, 0.0), scores.numel() / seconds)
    print(f"best of {args.rounds} interleaved rounds; matmul peak (best seen): fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    sgraf_rate = rates["SGRAF scheme"]
    percent_of_peak = {}
    for label, rate in rates.items():
        precision = chosen if label.startswith("auto") else "bf16" if label.startswith("bf16") else "fp32"
        achieved = flops_per_pair * rate / 1e9
        percent_of_peak[label] = 100 * achieved / peak[precision]
        where = "(a) SGRAF scheme, fp32 eager" if label == "SGRAF scheme" else f"(b) package path, {label}"
        extra = f", compile {compile_times[precision]:.0f} s" if label.endswith("compiled") else ""
        print(f"{where:34s}: {rate:7.0f} pairs/s, x{rate / sgraf_rate:5.2f} the SGRAF scheme, {achieved:4.0f} GFLOP/s "
              f"= {percent_of_peak[label]:3.0f}% of {precision} peak{extra}")
    faster = max(rates["fp32 eager"], rates["bf16 eager"])
    print(f"dtype auto chose {chosen} (probe {probe_seconds:.1f} s, once per process): "
          f"{100 * rates['auto eager'] / faster:.0f}% of the faster of fp32 and bf16 eager")
    print(f"peak RSS: {rss_before:.0f} MB before the timed rounds, {peak_rss_mb():.0f} MB after "
          f"(caches: {sum(v.numel() * v.element_size() for v in images.values()) / 2**20:.0f} MB images, "
          f"{sum(v.numel() * v.element_size() for v in texts.values()) / 2**20:.0f} MB captions)")

    if args.plot:
        plot(rates, percent_of_peak, args.plot, f"MPSM scoring, embed {config.embed_size}, sim {config.sim_dim}, "
             f"{num_images} x {num_texts} pairs, {args.threads} threads")
        print(f"plot: {args.plot}")
    fp32 = results["fp32 eager"]
    assert (fp32[:, : reference.shape[1]] - reference).abs().max() < 1e-4, "package path disagrees with SGRAF scheme"
    best_label, best_rate = max(rates.items(), key=lambda item: item[1])
    encode = 1000 * image_time / num_images + 5000 * text_time / num_texts
    refine = 0.0
    if args.refine_k:  # float32 re-scoring of the bf16 top k of every query: (images + captions) model calls
        refined, seconds = timed(lambda: refine_top_k(model, images, texts, results["bf16 eager"].clone(),
                                                      args.refine_k, progress=False))
        results[f"bf16 eager + fp32 top-{args.refine_k}"] = refined
        refine = 6000 * seconds / (num_images + num_texts)
        print(f"fp32 re-scoring of the bf16 top {args.refine_k}: {1000 * seconds / (num_images + num_texts):.1f} ms "
              f"per query")
    print(f"projected 1000 x 5000 (5M pairs): {5e6 / best_rate / 60:.1f} min with {best_label} "
          f"(+{encode / 60:.1f} min encoding, +{refine / 60:.1f} min fp32 re-scoring of the top {args.refine_k}); "
          f"SGRAF scheme {5e6 / sgraf_rate / 60:.1f} min")
    report_agreement(results)

if __name__ == "__main__":
    main()
