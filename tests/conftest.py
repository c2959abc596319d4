"""Fixtures shared by the test modules."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny synthetic data set in the SCAN format (20 train / 10 dev / 10 test images, 16-d features)."""
    path = tmp_path_factory.mktemp("scan") / "data"
    subprocess.run([sys.executable, "-m", "modeling_mpsm.data.synthetic", "--output_dir", str(path), "--num_train", "20",
                    "--num_dev", "10", "--num_test", "10", "--feature_dim", "16"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    return str(path)
