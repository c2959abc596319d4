"""Runs `shared/peers/sgraf_train.py` unchanged and keeps the score matrix SGRAF's own evaluation computes.

    python benchmarks/sgraf_scores.py SCORES.npy SGRAF_TRAIN_SCRIPT SGRAF_GIT_DIR DATA_DIR [its options ...]

The peer script trains SGRAF's SGR with SGRAF's code and prints R@K from SGRAF's `evaluation.shard_attn_scores` and
`i2t` / `t2i`, but does not keep the [images, captions] matrix. This launcher runs the script as `__main__` with
one addition: when SGRAF's `evaluation` module is imported, its `shard_attn_scores` is wrapped so that the matrix it
returns is also saved to SCORES.npy (float32). Nothing SGRAF computes changes. `benchmarks/ablations.py` uses the
matrix for the twin probe of the SGRAF row (`modeling_mpsm.data.synthetic.twin_accuracy`).
"""

import importlib.abc
import importlib.machinery
import runpy
import sys

import numpy as np


class SavingEvaluationFinder(importlib.abc.MetaPathFinder):
    """Finds SGRAF's `evaluation` module where the import system would, and wraps its `shard_attn_scores`."""

    def __init__(self, scores_path):
        self.scores_path = scores_path

    def find_spec(self, name, path, target=None):
        if name != "evaluation":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            shard_attn_scores = module.shard_attn_scores

            def saving_shard_attn_scores(*args, **kwargs):
                scores = shard_attn_scores(*args, **kwargs)
                np.save(self.scores_path, np.asarray(scores, dtype=np.float32))
                return scores

            module.shard_attn_scores = saving_shard_attn_scores

        spec.loader.exec_module = exec_module
        return spec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    scores_path, script, *script_arguments = argv
    sys.meta_path.insert(0, SavingEvaluationFinder(scores_path))
    sys.argv = [script, *script_arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
