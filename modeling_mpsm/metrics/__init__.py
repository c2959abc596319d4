"""`evaluate` metric modules of modeling_mpsm, shipped in the package; load one from any directory with

    import evaluate, modeling_mpsm.metrics
    recall_at_k = evaluate.load(modeling_mpsm.metrics.RECALL_AT_K)
"""

from pathlib import Path

RECALL_AT_K = str(Path(__file__).resolve().parent / "recall_at_k")
