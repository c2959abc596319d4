"""Cost of one training update (forward, backward, Adam, gradient clipping at 2) at paper size, against SGRAF's own code.

    python benchmarks/train_step.py --sgraf_repo SGRAF_GIT_DIR            # batch 32 and 128, with and without
                                                                          # gradient checkpointing, and SGRAF's SGR
    python benchmarks/train_step.py --batch_sizes 64 --embed 256 --sim 64 --word 128 --img 256 --vocab 200

Every configuration runs in its own process, so that its peak resident memory (`ru_maxrss`) is its own; the processes
are interleaved over `--rounds` rounds (MPSM, MPSM with checkpointing, SGRAF, MPSM, ...) so that a drift of the
machine's speed touches all alike; seconds per update are the median over rounds of the mean over `--steps` updates
after `--warmup` updates (a fresh process's first updates also pay for growing its memory). Batches are the same for
all: 36 regions of `--img` features with boxes, captions of Flickr30K-like lengths (5-30 words + <start>/<end>, mean
~15), the neighbour-chain dependency graph. SGRAF's SGR is
SGRAF's `model.py` from the given git directory, patched only to run on a CPU under Python 3 (as
`shared/peers/train_speed.py` does), trained with its own `train_emb`; MPSM's update is the package's (its
`create_optimizer`, fused Adam where the device has it). With `--bf16_rows`, both also run under
`torch.autocast(dtype=torch.bfloat16)` (mixed precision, as `accelerate launch --mixed_precision bf16` trains), beside
the float32 rows: bf16 is faster on some CPUs and slower on others, so it is measured, not assumed.
Prints one table (s/update, peak RSS) and the ratios MPSM / SGRAF at the same precision measured in this run.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from typing import NamedTuple

import torch

from scoring import matmul_peak  # benchmarks/scoring.py, beside this file


def caption_batch(batch, vocab, seed=0):
    """Word ids [B, L] sorted by decreasing length (as SGRAF's loader gives them), their lengths and mask."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.distributions.Gamma(2.0, 1 / 3.8).sample((batch,)).round() + 5
    lengths = sorted((words.clamp(5, 30).long() + 2).tolist(), reverse=True)
    mask = (torch.arange(lengths[0])[None] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(4, vocab, (batch, lengths[0]), generator=generator) * mask, lengths, mask


def image_batch(batch, img_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 36, img_dim, generator=generator).relu()
    corners = torch.rand(batch, 36, 2, generator=generator) * 0.6
    return features, torch.cat([corners, corners + 0.05 + 0.3 * torch.rand(batch, 36, 2, generator=generator)], -1)


def mpsm_update(args):
    from modeling_mpsm import MPSMConfig, MPSMModel
    from modeling_mpsm.modeling_mpsm import chain_adjacency
    from modeling_mpsm.training import create_optimizer

    config = MPSMConfig(vocab_size=args.vocab, img_dim=args.img, embed_size=args.embed, sim_dim=args.sim,
                        word_dim=args.word)
    model = MPSMModel(config).train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    optimizer = create_optimizer(model, learning_rate=2e-4)
    input_ids, _, mask = caption_batch(args.batch, args.vocab)
    features, boxes = image_batch(args.batch, args.img)
    inputs = dict(region_features=features, boxes=boxes, input_ids=input_ids, attention_mask=mask,
                  dependency_adjacency=chain_adjacency(mask), return_loss=True)

    def update():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    return update


def sgraf_update(args):
    work = tempfile.mkdtemp(prefix="sgraf_src_")
    source = subprocess.run(["git", "-C", args.sgraf_repo, "show", "HEAD:model.py"], capture_output=True, text=True,
                            check=True).stdout
    source = source.replace("        if torch.cuda.is_available():\n            I = mask.cuda()\n",
                            "        I = mask.cuda() if torch.cuda.is_available() else mask\n")  # CPU
    source = source.replace("cap_emb.size(2)/2", "cap_emb.size(2)//2")  # Python 3 division
    with open(os.path.join(work, "model.py"), "w") as file:
        file.write(source)
    sys.path.insert(0, work)
    import model as sgraf

    options = types.SimpleNamespace(
        img_dim=args.img, word_dim=args.word, embed_size=args.embed, sim_dim=args.sim, num_layers=1, bi_gru=True,
        no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3, margin=0.2, max_violation=True,
        grad_clip=2.0, learning_rate=2e-4, vocab_size=args.vocab,
    )
    model = sgraf.SGRAF(options)
    model.logger = types.SimpleNamespace(update=lambda *a, **k: None)
    model.train_start()
    input_ids, lengths, _ = caption_batch(args.batch, args.vocab)
    features, _ = image_batch(args.batch, args.img)

    def update():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            model.train_emb(features, input_ids, lengths)

    return update


def worker(args):
    """One configuration in this process: prints {"seconds": s/update, "peak_rss_mb": MB}."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    update = sgraf_update(args) if args.model == "sgraf" else mpsm_update(args)
    for _ in range(args.warmup):
        update()
    started = time.perf_counter()
    for _ in range(args.steps):
        update()
    seconds = (time.perf_counter() - started) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


SIZE_FLAGS = ("embed", "sim", "word", "img", "vocab")
SGRAF = "SGRAF SGR (its own code)"


class Row(NamedTuple):
    name: str
    model: str  # "mpsm" or "sgraf"
    checkpointing: bool
    bf16: bool


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sgraf_repo", help="git directory of Paranioar/SGRAF: adds its SGR as the baseline")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--sim", type=int, default=256)
    parser.add_argument("--word", type=int, default=300)
    parser.add_argument("--img", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8481)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed updates per process, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per process before the timed ones")
    parser.add_argument("--bf16_rows", action="store_true", help="add MPSM and SGRAF under bf16 autocast")
    parser.add_argument("--no_checkpointing_rows", action="store_true", help="skip the gradient-checkpointing rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["mpsm", "sgraf"], default="mpsm", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    rows = [Row("MPSM", "mpsm", False, False)]
    if not args.no_checkpointing_rows:
        rows.append(Row("MPSM, gradient checkpointing", "mpsm", True, False))
    if args.sgraf_repo:
        rows.append(Row(SGRAF, "sgraf", False, False))
    if args.bf16_rows:
        rows += [Row(f"{row.name}, bf16 autocast", row.model, row.checkpointing, True) for row in rows
                 if not row.checkpointing]
    sizes = [f"--{flag}={getattr(args, flag)}" for flag in SIZE_FLAGS]
    print(f"embed {args.embed}, sim {args.sim}, word {args.word}, {args.img}-d regions, vocab {args.vocab}; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} updates per configuration after "
          f"{args.warmup} warm-up; matmul peak now: {matmul_peak(torch.float32):.0f} GFLOP/s float32, "
          f"{matmul_peak(torch.bfloat16):.0f} bfloat16")
    results = {}
    for batch in args.batch_sizes:
        for round_index in range(args.rounds):
            for row in rows:
                command = [sys.executable, os.path.abspath(__file__), "--worker", "--model", row.model, "--batch",
                           str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup), *sizes]
                command += ["--checkpointing"] if row.checkpointing else []
                command += ["--bf16"] if row.bf16 else []
                command += ["--sgraf_repo", args.sgraf_repo] if row.model == "sgraf" else []
                finished = subprocess.run(command, capture_output=True, text=True)
                if finished.returncode != 0:
                    raise RuntimeError(f"{row.name}, batch {batch} failed (exit {finished.returncode}):\n"
                                       f"{finished.stderr}")
                results.setdefault((batch, row.name), []).append(json.loads(finished.stdout.strip().splitlines()[-1]))
                print(f"  batch {batch}, round {round_index + 1}: {row.name}: {results[batch, row.name][-1]}",
                      flush=True)

    print("\n| batch | configuration | s / update | peak RSS (MB) | time vs SGRAF | memory vs SGRAF |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        summary = {row.name: (statistics.median(r["seconds"] for r in results[batch, row.name]),
                              max(r["peak_rss_mb"] for r in results[batch, row.name])) for row in rows}
        for row in rows:  # against SGRAF at the same precision
            seconds, peak = summary[row.name]
            baseline = summary.get(f"{SGRAF}, bf16 autocast" if row.bf16 else SGRAF)
            ratios = ("-", "-") if baseline is None else (f"x{seconds / baseline[0]:.2f}", f"x{peak / baseline[1]:.2f}")
            print(f"| {batch} | {row.name} | {seconds:.2f} | {peak:,.0f} | {ratios[0]} | {ratios[1]} |")
        if "MPSM, gradient checkpointing" in summary:
            plain, checkpointed = summary["MPSM"][1], summary["MPSM, gradient checkpointing"][1]
            print(f"| {batch} | checkpointing: memory / without | | | | x{checkpointed / plain:.2f} |")


if __name__ == "__main__":
    main()
