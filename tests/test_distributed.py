"""Two CPU processes (DDP over gloo) train for a few steps: both end with identical weights and exit with code 0."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from modeling_mpsm.data import synthetic


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_AND_HASH = os.path.join(REPO, "tests", "train_and_hash.py")  # examples/train_mpsm.py, then each rank's hash
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(ACCELERATE) and not shutil.which("accelerate"), reason="needs accelerate's CLI")
@pytest.mark.parametrize("cpu_flag", [["--cpu"], []], ids=["with-cpu-flag", "without-cpu-flag"])
def test_two_processes_end_with_identical_weights_and_exit_cleanly(tmp_path, cpu_flag):
    """With or without the script's --cpu: on a machine without a GPU the two processes form one gloo group (before,
    without --cpu they were two independent rank-0 runs writing into one folder)."""
    data_dir, output_dir = tmp_path / "scan", tmp_path / "run"
    synthetic.generate(str(data_dir), seed=5, num_train=16, num_dev=4, num_test=4, feature_dim=32, num_regions=8)
    launcher = ACCELERATE if os.path.exists(ACCELERATE) else shutil.which("accelerate")
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        TRAIN_AND_HASH, str(tmp_path / "hash_{rank}.txt"), *cpu_flag, "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--parser", "fallback",
        "--set", "embed_size=32", "sim_dim=16", "word_dim=16", "kgid_layers=1", "srgr_steps=1",
        "--batch_size", "8", "--max_train_steps", "4", "--warmup_steps", "2", "--checkpointing_steps", "2",
        "--eval_steps", "2", "--logging_steps", "1",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr

    hashes = [(tmp_path / f"hash_{rank}.txt").read_text().strip() for rank in range(2)]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]
    # Each process trained on its own half of every batch: 4 updates, checkpoints at 2 and 4, both with RNG states.
    for step in (2, 4):
        names = os.listdir(output_dir / "checkpoints" / f"step_{step}")
        assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= set(names)
    assert (output_dir / "model.safetensors").is_file()
