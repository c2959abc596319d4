"""benchmarks/ablations.py's reading of the claims: unpaired (two spreads of the rows) and seed by seed."""

import os

from tiny import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablations():
    return load_script("benchmarks/ablations.py")


def runs(module, rsums, twin=None):
    return [{**{key: 0.0 for key in module.METRIC_KEYS}, "rsum": rsum, "seed": seed,
             **({"twin_accuracy": twin} if twin else {})} for seed, rsum in enumerate(rsums)]


def test_a_gap_shared_by_every_seed_is_held_paired_but_not_unpaired():
    """Rows 480/470/490 and 470/461/479: the gap (+10) is under two spreads of the rows (2 x 10), but the per-seed
    differences 10, 9, 11 are +10 ± 1, held; a reversed gap reads 'reversed'."""
    ablations = load_ablations()
    results = {"MPSM (dis)": runs(ablations, [480, 470, 490]), "w/o KGID": runs(ablations, [470, 461, 479]),
               "1 KGID": runs(ablations, [500, 490, 510])}
    lines = ablations.read_claims(ablations.summarise(results), results).splitlines()
    kgid = next(line for line in lines if line.startswith("| Table 2: KGID helps"))
    assert "| +10.0 | 20.0 | within noise | +10.0 ± 1.0 (3) | held |" in kgid
    three_vs_one = next(line for line in lines if line.startswith("| Table 3: 3 KGID layers beat 1"))
    assert "| -20.0 | 20.0 | within noise | -20.0 ± 0.0 (3) | reversed |" in three_vs_one


def test_twin_columns_average_the_attribute_changes():
    ablations = load_ablations()
    twin = {"color": 80.0, "size": 70.0, "material": 90.0, "count": 55.0, "relation": 50.0}
    summary = ablations.summarise({"MPSM (dis)": runs(ablations, [480, 490], twin)})["MPSM (dis)"]
    assert summary["attribute twins"] == (80.0, 0.0) and summary["relation twins"] == (50.0, 0.0)
    assert summary["count twins"] == (55.0, 0.0)


def test_sgraf_launcher_runs_the_peer_script_unchanged_and_keeps_its_score_matrix(tmp_path):
    """benchmarks/sgraf_scores.py: a stand-in peer script that imports its own `evaluation` module (as
    shared/peers/sgraf_train.py imports SGRAF's) runs as __main__ with its arguments; the matrix its
    `shard_attn_scores` returns is used by the script as before and also saved."""
    import subprocess
    import sys

    import numpy as np

    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "evaluation.py").write_text(
        "import numpy as np\n"
        "def shard_attn_scores(scale):\n"
        "    return scale * np.arange(6, dtype=np.float64).reshape(2, 3)\n")
    (peer / "train.py").write_text(
        "import json, os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "import evaluation\n"
        "assert __name__ == '__main__'\n"
        "sims = evaluation.shard_attn_scores(float(sys.argv[1]))\n"
        "print(json.dumps({'argv': sys.argv[1:], 'sum': float(sims.sum())}))\n")
    scores_path = tmp_path / "scores.npy"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "sgraf_scores.py"), str(scores_path),
                             str(peer / "train.py"), "2.0", "--flag"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '{"argv": ["2.0", "--flag"], "sum": 30.0}'
    scores = np.load(scores_path)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, 2.0 * np.arange(6).reshape(2, 3))


def test_partner_file_for_every_row_from_the_twin_records_or_the_captions(tmp_path):
    """--batches twins: the twin of each training image from its scene record; --batches captions: partners mined
    from the captions (mutual pairs); random: none. The file is written once and reused."""
    import argparse
    import json

    ablations = load_ablations()
    records = [{"twin": 1}, {"twin": 0}, {"twin": 3}, {"twin": 2}]
    (tmp_path / "train_scenes.json").write_text(json.dumps(records))
    (tmp_path / "train_caps.txt").write_text(
        "\n".join(["a man in a red shirt"] * 5 + ["a dog runs on the beach"] * 5
                  + ["a man in a red shirt walks"] * 5 + ["a dog runs on the sand"] * 5) + "\n")
    twins = ablations.partner_file(argparse.Namespace(batches="twins"), str(tmp_path))
    assert json.loads(open(twins).read()) == [1, 0, 3, 2]
    mined = ablations.partner_file(argparse.Namespace(batches="captions"), str(tmp_path))
    assert json.loads(open(mined).read()) == [2, 3, 0, 1]
    assert ablations.partner_file(argparse.Namespace(batches="random"), str(tmp_path)) is None


def test_oracle_table_reads_the_people_scenes(tmp_path):
    from modeling_mpsm.data import synthetic

    ablations = load_ablations()
    synthetic.generate(str(tmp_path), seed=1, num_train=2, num_dev=2, num_test=60, feature_dim=64, num_regions=12)
    table = ablations.oracle_table(str(tmp_path))
    assert "| bag of regions |" in table and "| regions with boxes |" in table and "binding" in table
