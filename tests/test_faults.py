"""Faults during long runs.

- A training subprocess killed with SIGKILL at seeded random points, some of them while a checkpoint is being written
  (right after `.tmp-step_N` appears), always leaves a loadable latest checkpoint, and resuming after every kill ends
  with exactly the weights of an uninterrupted run.
- After `--max_nonfinite_steps` non-finite losses in a row the run stops with a message saying so and naming the
  intact checkpoint.
- Exhaustive scoring stays within its memory bound on a gallery whose pair tensors would take 5x the bound unchunked.
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import modeling_mpsm.modeling_mpsm as modeling
from modeling_mpsm.training import resolve_checkpoint

from hooks import nan_losses_at
from tiny import load_script


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "examples", "train_mpsm.py")
MAX_STEPS = 12


def env():
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_command(data_dir, output_dir, *extra):
    """12 updates of a tiny model (embed 16), a checkpoint every 2 updates, validation after epoch 1 (update 10)."""
    return [sys.executable, TRAIN_SCRIPT, "--data_dir", data_dir, "--output_dir", str(output_dir), "--parser",
            "fallback", "--set", "embed_size=16", "sim_dim=8", "word_dim=8", "kgid_layers=1", "srgr_steps=1",
            "--batch_size", "10", "--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "2",
            "--warmup_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--vocab_min_count", "1", "--max_eval_images", "5",
            *extra]


def checkpoint_weights(run_dir, step=None):
    folder = resolve_checkpoint(str(run_dir), "latest") if step is None else os.path.join(run_dir, "checkpoints", f"step_{step}")
    return os.path.basename(folder), load_file(os.path.join(folder, "model.safetensors"))


def kill_at(process, run_dir, event):
    """SIGKILL `process` at `event`: ("writing", N) as soon as `.tmp-step_N` exists (mid checkpoint write), or
    ("training", N, delay) `delay` seconds after checkpoint step_N is complete (mid update). Returns whether the kill
    landed while the checkpoint was still being written."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    target = f".tmp-step_{event[1]}" if event[0] == "writing" else f"step_{event[1]}"
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(checkpoints, target)):
        assert process.poll() is None, f"the run ended before {target}"
        assert time.time() < deadline
        time.sleep(0.0005)
    if event[0] == "training":
        time.sleep(event[2])
    process.send_signal(signal.SIGKILL)
    process.wait()
    return event[0] == "writing" and not os.path.isdir(os.path.join(checkpoints, f"step_{event[1]}"))


def test_sigkill_at_random_points_then_resume_is_exact(data_dir, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(train_command(data_dir, reference), check=True, env=env(), capture_output=True, timeout=300)
    _, expected = checkpoint_weights(reference, MAX_STEPS)

    rng = random.Random(2022)
    steps = sorted(rng.sample([4, 6, 8, 10], 3))
    events = [("writing", steps[0]), ("training", steps[1], rng.uniform(0.0, 0.05)), ("writing", steps[2])]
    mid_write, resumed = 0, 0
    for number, event in enumerate(events):
        extra = ["--resume_from_checkpoint", "latest"] if number else []
        process = subprocess.Popen(train_command(data_dir, interrupted, *extra), env=env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed += bool(number)
        mid_write += kill_at(process, interrupted, event)
        # Whatever the kill interrupted, `latest` names a complete checkpoint that loads, with finite weights.
        name, weights = checkpoint_weights(interrupted)
        assert int(name.split("_")[1]) <= event[1] and weights.keys() == expected.keys()
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())
        assert not os.path.exists(os.path.join(interrupted, "checkpoints", f"step_{MAX_STEPS}"))

    subprocess.run(train_command(data_dir, interrupted, "--resume_from_checkpoint", "latest"), check=True, env=env(),
                   capture_output=True, timeout=300)
    resumed += 1
    _, final = checkpoint_weights(interrupted, MAX_STEPS)
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert not [name for name in os.listdir(interrupted / "checkpoints") if name.startswith(".tmp")]
    with open(interrupted / "training_log.jsonl", encoding="utf-8") as file:
        steps_logged = [record["step"] for record in map(json.loads, file) if "loss" in record]
    assert steps_logged == list(range(1, MAX_STEPS + 1))  # nothing lost, nothing logged twice
    print(f"faults injected: {len(events)} SIGKILLs ({mid_write} mid checkpoint write), runs resumed: {resumed}")


def test_nonfinite_losses_in_a_row_stop_with_a_clear_message(data_dir, tmp_path, caplog, monkeypatch):
    script = load_script("examples/train_mpsm.py")
    nan_losses_at(monkeypatch, {5, 6, 7, 8})
    argv = train_command(data_dir, tmp_path)[2:] + ["--max_nonfinite_steps", "3"]
    with caplog.at_level(logging.ERROR), pytest.warns(UserWarning, match="Non-finite loss"):
        assert script.main(argv) == 1
    checkpoints = os.path.join(tmp_path, "checkpoints")
    assert f"3 consecutive batches had a non-finite loss or gradient (step 7); training stopped. " \
           f"The last checkpoint in {checkpoints} is intact" in caplog.text
    name, weights = checkpoint_weights(tmp_path)
    assert name == "step_6" and all(torch.isfinite(tensor).all() for tensor in weights.values())


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    import modeling_mpsm.modeling_mpsm as modeling
    from modeling_mpsm import MPSMConfig, MPSMModel
    from modeling_mpsm.scoring import encode_images, encode_texts, score_matrix

    bound, num_images, num_texts, words = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 12
    modeling.CAPTION_BLOCKS = int(sys.argv[5])
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(img_dim=16, vocab_size=50, word_dim=8, embed_size=16, sim_dim=8)).eval()
    images = encode_images(model, [{"region_features": torch.randn(num_images, 36, 16)}], progress=False)
    texts = encode_texts(model, [{"input_ids": torch.randint(4, 50, (num_texts, words))}], progress=False)
    score_matrix(model, images, texts, max_block_bytes=bound, progress=False)  # warm-up: kernels, allocator pools

    def status(key):
        with open("/proc/self/status") as file:
            return 1024 * int(next(line.split()[1] for line in file if line.startswith(key)))

    with open("/proc/self/clear_refs", "w") as file:  # resets the peak (VmHWM) to the current RSS
        file.write("5")
    before = status("VmRSS:")
    scores = score_matrix(model, images, texts, max_block_bytes=int(sys.argv[4]), progress=False)
    print(json.dumps({"growth": status("VmHWM:") - before, "pairs_bytes": num_images * num_texts *
                      modeling.pair_bytes(model, 36, words), "finite": bool(torch.isfinite(scores).all())}))
""")


def peak_growth(bound, num_images, num_texts, max_block_bytes, caption_blocks):
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(bound), str(num_images), str(num_texts),
                             str(max_block_bytes), str(caption_blocks)], capture_output=True, text=True, env=env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scoring_memory_stays_within_its_bound_on_a_5x_gallery():
    bound = 32 * 2**20
    # pair_bytes(embed 16, sim 8, 36 regions, 12 words) = 21,888 bytes: 120 x 94 pairs hold 7.4x the bound unchunked
    num_images, num_texts = 120, 94
    bounded = peak_growth(bound, num_images, num_texts, bound, modeling.CAPTION_BLOCKS)
    assert bounded["finite"] and bounded["pairs_bytes"] >= 5 * bound
    slack = 16 * 2**20  # allocator granularity, the score matrix, block copies of the caches
    assert bounded["growth"] < bound + slack, bounded
    # The measurement can see the difference: unchunked (one block of pairs, and the model's per-pair part in one block
    # of captions, which otherwise keeps a quarter of it alive at a time), the same gallery grows far past the bound.
    unchunked = peak_growth(bound, num_images, num_texts, 100 * bound, caption_blocks=1)
    assert unchunked["growth"] > 2 * bound, unchunked
    print(f"peak RSS growth: {bounded['growth'] / 2**20:.1f} MiB bounded (bound {bound / 2**20:.0f} MiB), "
          f"{unchunked['growth'] / 2**20:.1f} MiB unchunked")
