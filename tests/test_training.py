"""Training: schedule, warm-up, sampler, checkpoints; examples/train_mpsm.py end to end (loss falls, best model loads in a
fresh process, non-finite steps skipped, exact resumption after SIGKILL)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from modeling_mpsm.data import synthetic
from modeling_mpsm.training import (
    EpochSampler,
    NonFiniteLossError,
    PartnerSampler,
    TrainingState,
    create_optimizer,
    resolve_checkpoint,
    step_decay_schedule,
    use_max_violation,
)

from hooks import nan_losses_at
from tiny import load_script


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "examples", "train_mpsm.py")
TINY_MODEL = ["--set", "embed_size=32", "sim_dim=16", "word_dim=16", "kgid_layers=1", "srgr_steps=1"]


def subprocess_env():
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def load_train_script():
    return load_script("examples/train_mpsm.py")


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan")
    synthetic.generate(str(path), seed=3, num_train=24, num_dev=6, num_test=6, feature_dim=32, num_regions=8)
    return str(path)


def train_args(scan_dir, output_dir, *extra):
    return ["--data_dir", scan_dir, "--output_dir", str(output_dir), "--parser", "fallback", *TINY_MODEL,
            "--batch_size", "10", "--logging_steps", "1", "--learning_rate", "1e-3", *extra]


# ------------------------------------------------------------------------------------------------ pieces


def test_optimizer_is_fused_adam_unless_a_gradient_scaler_needs_to_see_skipped_steps():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    fused, plain = create_optimizer(model, 1e-3), create_optimizer(model, 1e-3, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [p for group in fused.param_groups for p in group["params"]] == [model.weight]  # trainable ones only
    weights = []
    for optimizer in (fused, plain):  # the same update either way
        with torch.no_grad():
            model.weight.copy_(torch.ones(2, 3))
        model.weight.grad = torch.full((2, 3), 0.5)
        optimizer.step()
        weights.append(model.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])
    torch.testing.assert_close(weights[0], torch.full((2, 3), 1 - 1e-3))  # Adam's first step: lr * sign(gradient)


def test_step_decay_schedule():
    optimizer = create_optimizer(torch.nn.Linear(2, 2), learning_rate=0.5)
    scheduler = step_decay_schedule(optimizer, updates_per_epoch=3, decay_epochs=[2, 4])
    lrs = []
    for _ in range(14):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:6] == [0.5] * 6
    assert lrs[6:12] == pytest.approx([0.05] * 6)
    assert lrs[12:] == pytest.approx([0.005] * 2)


def test_use_max_violation_switches_after_warmup():
    assert [use_max_violation(step, 3) for step in range(5)] == [False, False, False, True, True]
    assert not use_max_violation(10, 3, max_violation=False)  # the model's setting wins after the warm-up
    assert use_max_violation(0, 0)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    torch.manual_seed(0)
    first = list(EpochSampler(20, seed=1))
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(EpochSampler(20, seed=1)) == first
    assert sorted(first) == list(range(20))
    sampler = EpochSampler(20, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_partner_sampler_puts_each_caption_next_to_a_caption_of_its_partner():
    """Images 0-1 and 2-4 are partners, 3 has none; 2 captions per image. Every caption once per epoch; item pairs
    (0, 1), (2, 3), ... hold one caption of each partner; the unpaired image's captions come last; the order depends
    only on (seed, epoch)."""
    partners = [1, 0, 4, -1, 2]
    sampler = PartnerSampler(partners, captions_per_image=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    assert order[-2:] == [6, 7]  # image 3's captions
    for first, second in zip(order[:-2:2], order[1:-2:2]):
        assert partners[first // 2] == second // 2
    torch.manual_seed(99)
    assert list(PartnerSampler(partners, captions_per_image=2, seed=3)) == order
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != order
    with pytest.raises(ValueError, match="partners"):
        PartnerSampler([1, 2, 0], captions_per_image=2)  # 0 -> 1 but 1 -> 2


def test_train_script_batches_twins_together(scan_dir):
    """--partners train_scenes.json: every batch of the synthetic scenes holds each caption's twin image; an odd batch
    size or a list of the wrong length is refused, naming the flag."""
    script = load_train_script()
    scenes = os.path.join(scan_dir, "train_scenes.json")
    args = script.parse_args(["--data_dir", scan_dir, "--output_dir", "o", "--batch_size", "10", "--partners", scenes])
    with open(scenes) as file:
        twins = [record["twin"] for record in json.load(file)]
    train = script.load_split(scan_dir, "train", parser=script.get_dependency_parser("fallback"))
    loader = script.build_dataloader(args, train, processor=None)
    indices = list(loader.sampler)
    batches = [indices[start:start + 10] for start in range(0, len(indices) - 9, 10)]
    assert batches and all(twins[item // 5] in {other // 5 for other in batch} for batch in batches for item in batch
                           if twins[item // 5] >= 0)
    with pytest.raises(SystemExit):
        script.parse_args(["--data_dir", scan_dir, "--output_dir", "o", "--batch_size", "9", "--partners", scenes])
    with pytest.raises(ValueError, match="--partners"):
        script.read_partners(scenes, len(twins) + 1)


def test_training_state_round_trip():
    state = TrainingState(global_step=7, epoch=1, batches_in_epoch=3, best_rsum=12.5)
    restored = TrainingState()
    restored.load_state_dict(state.state_dict())
    assert restored == state


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        resolve_checkpoint(str(tmp_path), "latest")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ the script


def test_config_file_set_overrides_and_command_line(tmp_path):
    config = tmp_path / "training_args.json"
    config.write_text(json.dumps({
        "model": {"similarity": "direction", "embed_size": 64, "kgid_layers": 2},
        "training": {"learning_rate": 1e-3, "lr_decay_epochs": 15, "batch_size": 32, "seed": 4},
    }))
    args = load_train_script().parse_args([
        "--data_dir", "d", "--output_dir", "o", "--config", str(config), "--batch_size", "8",
        "--set", "kgid_layers=0", "use_srgr=false", "alignment=global", "--checkpointing_steps", "5",
    ])
    assert (args.learning_rate, args.lr_decay_epochs, args.batch_size, args.seed) == (1e-3, [15], 8, 4)
    assert args.model_fields == {"similarity": "direction", "embed_size": 64, "kgid_layers": 0, "use_srgr": False,
                                 "alignment": "global"}
    assert args.checkpointing_steps == 5
    with pytest.raises(SystemExit):
        load_train_script().parse_args(["--data_dir", "d", "--output_dir", "o", "--set", "not_a_field=1"])


def test_set_is_repeatable():
    """Each --set adds its fields (argparse keeps only the last --set without action="extend"); a KEY given twice
    takes its last value."""
    args = load_train_script().parse_args([
        "--data_dir", "d", "--output_dir", "o", "--set", "embed_size=64", "kgid_layers=2", "--similarity", "direction",
        "--set", "use_srgr=false", "--set", "kgid_layers=3",
    ])
    assert args.model_fields == {"similarity": "direction", "embed_size": 64, "kgid_layers": 3, "use_srgr": False}


def read_log(output_dir):
    with open(os.path.join(output_dir, "training_log.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def trained_run(scan_dir, tmp_path_factory):
    """One in-process run: 16 updates, sum-of-violations for the first 5, validation every 8, checkpoints every 4."""
    output_dir = tmp_path_factory.mktemp("run")
    argv = train_args(scan_dir, output_dir, "--max_train_steps", "16", "--warmup_steps", "5", "--eval_steps", "8",
                      "--checkpointing_steps", "4", "--checkpoints_total_limit", "2")
    assert load_train_script().main(argv) == 0
    return str(output_dir)


def test_loss_falls(trained_run):
    losses = [record["loss"] for record in read_log(trained_run) if "loss" in record]
    assert len(losses) == 16
    warmup = losses[:5]  # sum of violations: 2 * B * (B - 1) * margin = 36 when all logits are equal
    assert 25.0 < warmup[0] <= 1.5 * 36.0  # bounded SRGR nodes: the logits start near one value
    assert sum(warmup[-2:]) / 2 < warmup[0]
    assert sum(losses[-4:]) / 4 < sum(losses[5:9]) / 4  # hardest negatives phase


def test_warmup_switches_loss_mode_at_the_right_step(trained_run):
    modes = {record["step"]: record["max_violation"] for record in read_log(trained_run) if "loss" in record}
    assert [modes[step] for step in range(1, 17)] == [False] * 5 + [True] * 11


def test_run_outputs(trained_run):
    names = set(os.listdir(trained_run))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "eval_results.json",
            "training_log.jsonl", "training_curves.png", "training_args.json"} <= names
    assert not [name for name in names if name.startswith(".tmp")]
    validations = [record for record in read_log(trained_run) if "rsum" in record]
    assert [record["step"] for record in validations] == [8, 12, 16]  # every 8 updates and after epoch 1 (12)
    with open(os.path.join(trained_run, "eval_results.json"), encoding="utf-8") as file:
        best = json.load(file)
    assert best["rsum"] == max(record["rsum"] for record in validations)
    checkpoints = os.path.join(trained_run, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_12", "step_16"]  # total limit 2
    assert resolve_checkpoint(trained_run, "latest").endswith("step_16")
    with open(os.path.join(trained_run, "training_curves.png"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_model_loads_in_a_fresh_process(trained_run):
    code = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        "from modeling_mpsm import MPSMProcessor\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "processor = MPSMProcessor.from_pretrained(sys.argv[1])\n"
        "batch = processor(text=['a red car', 'two dogs'], region_features=torch.rand(2, 8, 32))\n"
        "print(type(model).__name__, tuple(model(**batch).logits_per_image.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, trained_run], capture_output=True, text=True,
                            env=subprocess_env(), cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("MPSMModel (2, 2)")


def test_activation_checkpointing_flag_trains_the_same_weights(scan_dir, tmp_path):
    """--activation_checkpointing recomputes the per-pair part in the backward pass: same losses, same weights."""
    weights = []
    for name, extra in (("plain", []), ("checkpointed", ["--activation_checkpointing"])):
        output_dir = tmp_path / name
        assert load_train_script().main(train_args(scan_dir, output_dir, "--max_train_steps", "3", *extra)) == 0
        weights.append(load_file(os.path.join(output_dir, "checkpoints", "step_3", "model.safetensors")))
        losses = [record["loss"] for record in read_log(str(output_dir)) if "loss" in record]
        if name == "plain":
            plain_losses = losses
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_is_skipped_and_counted(scan_dir, tmp_path, monkeypatch):
    nan_losses_at(monkeypatch, {1, 2})
    argv = train_args(scan_dir, tmp_path, "--max_train_steps", "5")
    with pytest.warns(UserWarning, match="Non-finite loss"):
        assert load_train_script().main(argv) == 0
    log = read_log(str(tmp_path))
    assert [r["nonfinite_steps"] for r in log if "loss" in r] == [0, 1, 2, 2, 2]
    assert [r["loss"] is None for r in log if "loss" in r] == [False, True, True, False, False]
    weights = load_file(os.path.join(tmp_path, "checkpoints", "step_5", "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(scan_dir, tmp_path, monkeypatch):
    nan_losses_at(monkeypatch, range(3, 8))
    argv = train_args(scan_dir, tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2",
                      "--max_nonfinite_steps", "3")
    with pytest.warns(UserWarning, match="Non-finite loss"):
        assert load_train_script().main(argv) == 1
    # Updates 4-6 were skipped (3 in a row): stopped during update 6, before its checkpoint. Step 4's checkpoint holds
    # the weights of step 3, untouched by the skipped update.
    checkpoints = os.path.join(tmp_path, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_2", "step_4"]
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("step_4")
    weights = load_file(os.path.join(checkpoints, "step_4", "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_resume_after_sigkill_is_exact(scan_dir, tmp_path):
    """A run killed (SIGKILL) after its step-6 checkpoint and resumed ends with the weights of an uninterrupted run."""
    extra = ["--max_train_steps", "16", "--warmup_steps", "3", "--checkpointing_steps", "3", "--eval_steps", "5"]
    command = [sys.executable, TRAIN_SCRIPT]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(command + train_args(scan_dir, reference, *extra), check=True, env=subprocess_env(),
                   capture_output=True, timeout=300)

    process = subprocess.Popen(command + train_args(scan_dir, interrupted, *extra), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (interrupted / "checkpoints" / "step_6").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-6 checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "checkpoints" / "step_16").exists(), "killed too late to test resumption"

    subprocess.run(command + train_args(scan_dir, interrupted, *extra, "--resume_from_checkpoint", "latest"),
                   check=True, env=subprocess_env(), capture_output=True, timeout=300)
    expected = load_file(str(reference / "checkpoints" / "step_16" / "model.safetensors"))
    resumed = load_file(str(interrupted / "checkpoints" / "step_16" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    steps = [record["step"] for record in read_log(str(interrupted)) if "loss" in record]
    assert steps == list(range(1, 17))  # records of the killed run after its checkpoint were dropped


# ------------------------------------------------------------------------------------------------ fp16 gradient scaler


@pytest.fixture
def fp16_accelerator():
    """`make(init_scale)`: an Accelerator set up as for fp16 training on a GPU, on the CPU: fp16 autocast of the
    forward and a real `torch.amp.GradScaler` (Accelerate creates neither on a CPU, so both are set before
    `accelerator.prepare`, which hands the scaler to the optimizer). Accelerate's shared state is reset before and
    after, so the other in-process runs start from a clean state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    def make(init_scale):
        reset()
        accelerator = Accelerator(mixed_precision="fp16", cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        accelerator.native_amp = True
        return accelerator

    yield make
    reset()


def test_fp16_overflows_are_skipped_by_the_scaler_and_training_continues(scan_dir, tmp_path, fp16_accelerator,
                                                                          monkeypatch):
    """An initial loss scale of 2^20 makes the fp16 gradients overflow at first: each overflow update is skipped by
    the scaler, which halves its scale, and counted; training runs to its last step with finite weights. (Before, the
    loop skipped `optimizer.step()` itself, the scaler never updated, and the next `clip_grad_norm_` raised
    "unscale_() has already been called on this optimizer since the last update()".) A NaN loss at update 1 is still
    skipped and counted by the package, without touching the scale."""
    init_scale, steps = 2.0**20, 16
    script = load_train_script()
    nan_losses_at(monkeypatch, {1})
    args = script.parse_args(train_args(scan_dir, tmp_path, "--max_train_steps", str(steps)))
    accelerator = fp16_accelerator(init_scale)
    with pytest.warns(UserWarning, match="Non-finite loss or gradient at step 1"):
        state = script.run(args, accelerator)
    assert state.global_step == steps and state.nonfinite_steps == 1
    assert 0 < state.overflow_steps < steps - 1  # some updates overflowed, some went through
    assert accelerator.scaler.get_scale() == init_scale * 0.5**state.overflow_steps  # the scale fell once per overflow

    records = [record for record in read_log(str(tmp_path)) if "loss" in record]
    assert [record["step"] for record in records] == list(range(1, steps + 1))
    assert records[0]["overflow_steps"] == 1 and records[0]["loss_scale"] == init_scale / 2
    assert [record["nonfinite_steps"] for record in records[:3]] == [0, 1, 1]
    assert all(record["loss_scale"] == init_scale * 0.5 ** record["overflow_steps"] for record in records)
    assert records[-1]["overflow_steps"] == state.overflow_steps
    assert all(record["loss"] is not None and math.isfinite(record["loss"]) for record in records[2:])

    checkpoint = tmp_path / "checkpoints" / f"step_{steps}"
    assert (checkpoint / "scaler.pt").is_file()  # the scale is part of the checkpoint (exact resumption)
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    # Adam took exactly the updates that were neither a NaN loss nor an overflow.
    assert {int(param["step"]) for param in optimizer_state["state"].values()} == {steps - 1 - state.overflow_steps}
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_fp16_gradient_not_finite_at_any_scale_stops_the_run(scan_dir, tmp_path, fp16_accelerator, monkeypatch):
    """A gradient that is NaN whatever the scale: the scaler skips and halves (4 -> 2 -> 1, counted as overflows);
    once the scale is below 1 the package counts the skips as non-finite gradients and stops after
    --max_nonfinite_steps of them in a row."""
    script = load_train_script()

    class NaNGradientModel(script.MPSMModel):
        def __init__(self, config):
            super().__init__(config)
            for parameter in self.parameters():
                parameter.register_hook(lambda gradient: torch.full_like(gradient, math.nan))

    monkeypatch.setattr(script, "MPSMModel", NaNGradientModel)
    args = script.parse_args(train_args(scan_dir, tmp_path, "--max_train_steps", "8", "--max_nonfinite_steps", "2"))
    accelerator = fp16_accelerator(4.0)
    with pytest.warns(UserWarning, match="Non-finite loss or gradient at step 2"), \
            pytest.raises(NonFiniteLossError, match=r"2 consecutive batches had a non-finite loss or gradient \(step 3\)"):
        script.run(args, accelerator)
    records = [record for record in read_log(str(tmp_path)) if "loss" in record]
    assert [(r["step"], r["overflow_steps"], r["nonfinite_steps"], r["loss_scale"]) for r in records] == [
        (1, 1, 0, 2.0), (2, 2, 0, 1.0), (3, 2, 1, 0.5)]


def test_push_to_hub_publishes_the_best_model_with_its_dev_results(scan_dir, tmp_path):
    """--push_to_hub --hub_model_id: the run's best model goes up as publish_to_hub.py would send it (HfApi mocked)."""
    from unittest import mock

    from huggingface_hub import ModelCard

    uploaded = {}

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["card"] = ModelCard.load(os.path.join(folder, "README.md"))
        return mock.Mock(commit_url="https://huggingface.co/mpsm-org/tiny/commit/0")

    argv = train_args(scan_dir, tmp_path, "--max_train_steps", "3", "--push_to_hub", "--hub_model_id", "mpsm-org/tiny",
                      "--hub_private_repo", "--dataset_id", "synthetic-scenes")
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        hf_api.return_value.upload_folder.side_effect = upload_folder
        assert load_train_script().main(argv) == 0
    api = hf_api.return_value
    api.create_repo.assert_called_once_with("mpsm-org/tiny", private=True, exist_ok=True, repo_type="model")
    best = json.load(open(os.path.join(tmp_path, "eval_results.json")))
    api.upload_folder.assert_called_once_with(folder_path=mock.ANY, repo_id="mpsm-org/tiny", repo_type="model",
                                              commit_message=f"Upload tiny (step {best['step']})", revision=None)
    assert {"model.safetensors", "tokenizer.json", "processing_mpsm.py", "training_args.json", "README.md"} <= set(
        uploaded["files"]
    )
    results = {result.metric_name: result.metric_value for result in uploaded["card"].data.eval_results}
    assert results["RSUM"] == best["rsum"]
    assert {result.dataset_split for result in uploaded["card"].data.eval_results} == {"dev"}


@pytest.mark.parametrize("hub_arguments", [[], ["--hub_model_id", "no-namespace"], ["--hub_model_id", "a/b/c"]])
def test_push_to_hub_needs_a_repo_id(scan_dir, tmp_path, capsys, hub_arguments):
    with pytest.raises(SystemExit):
        load_train_script().parse_args(train_args(scan_dir, tmp_path, "--push_to_hub", *hub_arguments))
    assert "--push_to_hub needs --hub_model_id ORG/NAME" in capsys.readouterr().err
