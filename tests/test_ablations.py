"""benchmarks/ablations.py's reading of the claims: unpaired (two spreads of the rows) and seed by seed."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablations():
    spec = importlib.util.spec_from_file_location("ablations", os.path.join(REPO, "benchmarks", "ablations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
