"""Training of MPSM with 🤗 Accelerate: optimizer, step-decay schedule, hardest-negative warm-up, atomic and exactly
resumable checkpoints, atomic best-model saving, the training log and its plot, and the training loop.

`examples/train_mpsm.py` assembles these pieces; see `docs/training.md`.

Exact resumption rests on four things, all in the checkpoint written by `save_checkpoint`:
model, optimizer and schedule (`accelerator.save_state`), the RNG states of every process (dropout), and a
`TrainingState` holding the step and the position in the epoch. The data order of an epoch is a permutation seeded by
`(seed, epoch)` (`EpochSampler`), so a resumed run replays the same epoch and skips the batches already seen with
`accelerator.skip_first_batches`. With partners mined again during training (`PartnerRefresh`), the `PartnerSampler`'s
state (the epoch's partners and where each took over) is a fifth thing in the checkpoint.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable

import torch
from .common import argument, atomic_write, atomic_write_text, progress_bar


CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
LOG_FILE = "training_log.jsonl"
PLOT_FILE = "training_curves.png"
BEST_RESULTS_FILE = "eval_results.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# Under an fp16 gradient scaler, an update the scaler skips (inf/NaN gradient) while its scale is already below this is
# not a scaling overflow: the gradient is non-finite at any scale, so the package counts it as a non-finite gradient.
MIN_LOSS_SCALE = 1.0


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive training steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainingState:
    """Progress of a run, saved in every checkpoint (registered with `accelerator.register_for_checkpointing`).

    Attributes:
        global_step: optimizer updates done (skipped non-finite and overflow updates included).
        epoch: current epoch (0-based).
        batches_in_epoch: batches of the current epoch already consumed, on each process (the sampler position).
        best_rsum / best_step: best validation rsum so far and the step it was reached at.
        nonfinite_steps / nonfinite_in_row: batches skipped for a non-finite loss or gradient, in total and in a row.
        overflow_steps: updates skipped by the fp16 gradient scaler for an inf/NaN gradient (it then lowers its
            scale); not counted in `nonfinite_*`.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_rsum: float = -math.inf
    best_step: int = -1
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    overflow_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(torch.utils.data.Sampler):
    """A random permutation of `range(num_items)` drawn from its own generator seeded by `(seed, epoch)`.

    The order of an epoch depends on nothing else (not on the global RNG, not on how many batches were drawn before),
    which is what lets a resumed run replay it. `accelerator.prepare` shards it over processes and its data loader
    calls `set_epoch`.
    """

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def epoch_generator(self) -> torch.Generator:
        """The random stream of the current epoch, seeded by `(seed, epoch)` only (not named `generator`: Accelerate
        reads a sampler's `generator` attribute as a `torch.Generator` when it shards the data loader)."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self):
        return iter(torch.randperm(self.num_items, generator=self.epoch_generator()).tolist())

    def __len__(self) -> int:
        return self.num_items


class PartnerSampler(EpochSampler):
    """
    An `EpochSampler` over the captions of images that come in partner pairs (e.g. the synthetic scenes' twins, which
    differ in one attribute, count or relation): every caption is drawn once per epoch, next to a caption of its
    image's partner, so that a batch of even size holds each caption's partner image as a negative. Random in-batch
    negatives almost never pair an image with a near-duplicate, so without this the loss never asks the model to tell
    "a car left of a dog" from "a car right of a dog"; with it, it does in every batch.

    `replace_partners` changes the partners during training (partners mined again from the model being trained,
    `examples/train_mpsm.py --partners embeddings`): the captions already drawn in the epoch keep their places, the
    rest of the epoch is arranged with the new partners. The epoch's partners and where each took over are the
    sampler's state (`state_dict`, saved in checkpoints), so the order of an epoch depends only on the seed, the epoch
    and that state.

    Args:
        partners (`list[int]`): per image, the index of its partner image, or -1 (the image's captions come last).
        captions_per_image (`int`): items `k * i ... k * i + k - 1` are image i's captions.
    """

    def __init__(self, partners: list[int], captions_per_image: int, seed: int = 0):
        super().__init__(len(partners) * captions_per_image, seed)
        self.captions_per_image = captions_per_image
        self.partners = check_partners(partners, len(partners))
        self.segments = [(0, self.partners)]  # (position in the epoch's order, the partners from there on)

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:  # a new epoch is arranged with the current partners only
            self.segments = [(0, self.partners)]
        super().set_epoch(epoch)

    def replace_partners(self, partners: list[int], position: int):
        """The new `partners` arrange the current epoch from item `position` of its order on (the items before it,
        already drawn, keep their places)."""
        partners = check_partners(partners, len(self.partners))
        if not self.segments[-1][0] <= position <= self.num_items:
            raise ValueError(f"`position` must lie between {self.segments[-1][0]} (where the current partners took "
                             f"over) and {self.num_items} (the epoch's items), got {position}")
        self.partners = partners
        self.segments = [segment for segment in self.segments if segment[0] < position] + [(position, partners)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "segments": [[position, list(partners)] for position, partners in self.segments]}

    def load_state_dict(self, state: dict):
        self.epoch = state["epoch"]
        self.segments = [(position, check_partners(partners, len(self.partners)))
                         for position, partners in state["segments"]]
        self.partners = self.segments[-1][1]

    def __iter__(self):
        generator = self.epoch_generator()
        order = []
        for position, partners in self.segments:
            free = torch.ones(self.num_items, dtype=torch.bool)
            free[order[:position]] = False
            order = order[:position] + self._arrange(partners, free.tolist(), generator)
        return iter(order)

    def _arrange(self, partners: list[int], free: list[bool], generator: torch.Generator) -> list[int]:
        """The `free` captions in pairs (a caption of an image, a caption of its partner) in random order, then those
        without a partner's caption (of unpaired images, or one image's extra captions) in order."""
        k = self.captions_per_image
        units, singles = [], []
        for image, partner in enumerate(partners):
            own = [caption for caption in range(k * image, k * image + k) if free[caption]]
            if partner < 0:
                singles += own
            elif image < partner:
                theirs = [caption for caption in range(k * partner, k * partner + k) if free[caption]]
                theirs = [theirs[i] for i in torch.randperm(len(theirs), generator=generator).tolist()]
                units += zip(own, theirs)
                singles += own[len(theirs):] + theirs[len(own):]
        order = torch.randperm(len(units), generator=generator).tolist()
        return [item for unit in order for item in units[unit]] + sorted(singles)


def check_partners(partners: list[int], num_images: int) -> list[int]:
    """`partners` as a list if it gives each of `num_images` images a partner image that has it as its partner, or
    -1; otherwise a `ValueError` naming the first image that breaks the rule."""
    partners = list(partners)
    if len(partners) != num_images or not all(isinstance(partner, int) for partner in partners):
        raise ValueError(f"`partners` must list one partner index (int) per image ({num_images}), got "
                         f"{len(partners)} entries")
    for image, partner in enumerate(partners):
        if partner == image:
            raise ValueError(f"`partners` must pair each image with another one, got image {image} -> {image}")
        if partner >= 0 and (partner >= num_images or partners[partner] != image):
            raise ValueError(f"`partners` must pair images both ways: image {image} -> {partner} -> "
                             f"{partners[partner] if 0 <= partner < num_images else 'outside the split'}")
    return partners


def create_optimizer(
    model: torch.nn.Module, learning_rate: float = 2e-4, weight_decay: float = 0.0, fused: bool = True
) -> torch.optim.Optimizer:
    """
    Adam over the trainable parameters (the paper's optimizer; SGRAF's learning rate 2e-4). With `fused`, PyTorch's
    fused kernel where the parameters' device has one (one pass over each parameter and its state instead of several:
    faster, see docs/benchmarks.md); create it once the model is on its training device.
    Pass `fused=False` under an fp16 gradient scaler: the scaler hands a fused optimizer its overflow check and always
    calls its step, so an update skipped for an overflow could no longer be told apart (and counted).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if fused:
        try:
            return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused Adam for this device or dtype: the multi-tensor one
            pass
    return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)


def step_decay_schedule(
    optimizer: torch.optim.Optimizer, updates_per_epoch: int, decay_epochs: list[int], factor: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate × `factor` at the start of each epoch in `decay_epochs` (SCAN/SGRAF's schedule).

    Stepped once per optimizer update: update `u` belongs to epoch `u // updates_per_epoch`.
    """
    boundaries = sorted(epoch * updates_per_epoch for epoch in decay_epochs)

    def multiplier(update: int) -> float:
        return factor ** sum(update >= boundary for boundary in boundaries)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def use_max_violation(step: int, warmup_steps: int, max_violation: bool = True) -> bool:
    """Loss mode of update `step` (0-based): sum of violations during the first `warmup_steps` updates, then the
    model's `max_violation` setting (hardest negatives). Hardest negatives from the first step can stall training at a
    loss of 2 × batch × margin, where every score collapses to the same value (see docs/training.md)."""
    return max_violation and step >= warmup_steps


def set_loss_mode(model, step: int, warmup_steps: int) -> bool:
    """Sets the mode of every member's loss (`criterion.max_violation`) for update `step` (see `use_max_violation`)
    and returns it: the loss owns its mode, the loop flips it."""
    modes = []
    for member in model.members().values():
        member.criterion.max_violation = use_max_violation(step, warmup_steps, member.config.max_violation)
        modes.append(member.criterion.max_violation)
    return all(modes)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and the best model
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoint folders of a run, oldest step first."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted(int(m.group(1)) for m in map(_CHECKPOINT_RE.match, os.listdir(root)) if m)
    return [os.path.join(root, f"step_{step}") for step in steps]


def resolve_checkpoint(output_dir: str, checkpoint: str) -> str:
    """Folder of `checkpoint`: a path, or `"latest"` for the one named by `<output_dir>/checkpoints/latest`."""
    if checkpoint != "latest":
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"Checkpoint {checkpoint} does not exist.")
        return checkpoint
    pointer = os.path.join(output_dir, CHECKPOINTS_DIR, LATEST_FILE)
    if not os.path.isfile(pointer):
        raise FileNotFoundError(f"No checkpoint to resume from: {pointer} does not exist.")
    with open(pointer, encoding="utf-8") as file:
        path = os.path.join(output_dir, CHECKPOINTS_DIR, file.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {path}, which does not exist.")
    return path


def remove_unfinished_checkpoints(output_dir: str):
    """Deletes the temporary folders of checkpoints interrupted while being written (main process only)."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """
    Saves the full training state (`accelerator.save_state`: model, optimizer, registered objects, RNG of every
    process) to `<output_dir>/checkpoints/step_<step>`, atomically: it is written to a temporary folder renamed into
    place once complete, then the `latest` pointer is rewritten atomically. A killed run leaves either the previous
    checkpoint or the new one, never a partial one. Keeps the newest `total_limit` checkpoints if set.

    Must be called by every process. `output_dir` must be on a file system shared by all processes.
    """
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    final = os.path.join(root, f"step_{step}")
    temporary = os.path.join(root, f".tmp-step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary)
    except BaseException:  # e.g. OSError(ENOSPC): no half-written folder is left behind, `latest` is unchanged
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # only when a step is saved twice (same state)
        os.rename(temporary, final)
        atomic_write_text(os.path.join(root, LATEST_FILE), f"step_{step}\n")
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_pretrained_atomic(model, processor, output_dir: str, results: dict | None = None):
    """
    `save_pretrained` of `model` and `processor` into `output_dir` itself, beside other files of the run.

    Everything is first written to a temporary folder inside `output_dir`, then each file is moved into place with
    `os.replace` (atomic per file), the weights last: at any time `output_dir` holds complete files of the old or the
    new best model. `results` (e.g. the validation metrics) goes to `eval_results.json`. Main process only.
    """
    temporary = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-best-")
    try:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        if results is not None:
            with open(os.path.join(temporary, BEST_RESULTS_FILE), "w", encoding="utf-8") as file:
                json.dump(results, file, indent=2)
        for name in sorted(os.listdir(temporary), key=lambda name: name.endswith(".safetensors")):
            os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def sync_buffers(accelerator, model: torch.nn.Module):
    """Copies the buffers (batch-norm running statistics) of process 0 to the others.

    DDP broadcasts them at the start of each forward, but the last forward before validation or saving updates each
    process's copy with its own batch, so they differ slightly until then.
    """
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


# ----------------------------------------------------------------------------------------------------------------
# Training log
# ----------------------------------------------------------------------------------------------------------------


class TrainingLog:
    """JSON-lines record of training (`{"step", "loss", ...}`) and validation (`{"step", "rsum", ...}`) events in
    `<output_dir>/training_log.jsonl`, plotted to `<output_dir>/training_curves.png`. Writes on the main process only.
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, LOG_FILE)
        self.plot_path = os.path.join(output_dir, PLOT_FILE)
        self.enabled = enabled

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def restart_at(self, step: int):
        """Drops the records after `step` (written by an interrupted run after its last checkpoint)."""
        if self.enabled:
            kept = [record for record in self.records() if record["step"] <= step]
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")

    def plot(self):
        """Training loss and validation rsum against the step, as a PNG (written atomically)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        losses = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        rsums = [(r["step"], r["rsum"]) for r in records if "rsum" in r]
        figure, (loss_axis, rsum_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
        if losses:
            loss_axis.plot(*zip(*losses))
        loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
        if rsums:
            rsum_axis.plot(*zip(*rsums), marker="o")
        rsum_axis.set(xlabel="step", ylabel="rsum", title="validation rsum")
        figure.tight_layout()
        atomic_write(self.plot_path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
        plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class LoopSettings:
    """Settings of `train_loop`, declared once: `examples/train_mpsm.py`'s arguments extend them, each field's
    metadata being its flag's help and the rule its value follows (`common.VALUE_RULES`)."""

    output_dir: str = argument(help="Best model, processor, checkpoints, log and plot.")
    num_epochs: int = argument(30, must_be="positive integer")
    max_train_steps: int | None = argument(None, "Total updates; overrides --num_epochs.", "positive integer")
    grad_clip: float = argument(2.0, "Max gradient norm (inf: no clipping).", "positive number or inf")
    warmup_steps: int | None = argument(
        None, "Updates trained with the sum-of-violations loss before hardest negatives.", "non-negative integer")
    sum_violation_warmup_epochs: float = argument(
        1.0, "Warm-up length in epochs when --warmup_steps is not given.", "non-negative number")
    checkpointing_steps: int | str | None = argument(
        None, "Save the training state every N updates, or 'epoch'; always at the end.", "steps or epoch")
    checkpoints_total_limit: int | None = argument(None, "Keep only the newest N checkpoints.", "positive integer")
    eval_steps: int | None = argument(
        None, "Also validate every N updates (always after each epoch).", "positive integer")
    logging_steps: int = argument(10, must_be="positive integer")
    max_nonfinite_steps: int = argument(
        10, "Stop after this many consecutive batches with a non-finite loss or gradient.", "positive integer")


@dataclasses.dataclass
class PartnerRefresh:
    """
    Partners mined again as training goes (`examples/train_mpsm.py --partners embeddings`): after every `every`-th
    update (but the last), `mine()` replaces the partners of `sampler`, the training data loader's `PartnerSampler`,
    from the next batch on. `mine` is called on every process and must return the same partners on each (e.g. mined
    on the main process and broadcast), and must not draw from the global random number generators.
    """

    sampler: PartnerSampler
    mine: Callable[[], list[int]]
    every: int


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    """Whether `value` is finite on every process (one decision for all, so that they skip the same steps)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    return bool(accelerator.gather(flag).min() > 0)


def _apply_update(accelerator, model, optimizer, loss, state: TrainingState, grad_clip: float) -> bool:
    """
    Backward, gradient clipping and the optimizer step of one batch when its loss is finite on every process; returns
    whether the batch counted (False: skip it). With an fp16 gradient scaler (`accelerator.scaler`), a non-finite
    gradient is the scaler's: the update is still handed to `optimizer.step()`, which the scaler skips and follows with
    a lower scale; such updates are counted in `state.overflow_steps`, not as non-finite, unless the scale has already
    fallen below `MIN_LOSS_SCALE`.
    """
    scaler = getattr(accelerator, "scaler", None)  # fp16 on a GPU: a GradScaler; otherwise None
    finite = _all_finite(accelerator, loss)
    if finite:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            if scaler is None:
                finite = bool(torch.isfinite(grad_norm))
        if finite:
            # With a scaler, `clip_grad_norm_` has unscaled the gradients: the step must follow (and the scaler's
            # `update()` with it) even when they are not finite, or the next unscale fails.
            optimizer.step()
            if scaler is not None and accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                if scaler.get_scale() >= MIN_LOSS_SCALE:
                    state.overflow_steps += 1
                else:
                    finite = False  # not a scaling overflow: the package's non-finite gradient
    optimizer.zero_grad()
    return finite


def train_loop(
    accelerator,
    model,
    optimizer,
    scheduler,
    dataloader,
    state: TrainingState,
    settings: LoopSettings,
    validate: Callable[[], dict],
    save_best: Callable[[dict], None],
    log: TrainingLog,
    refresh: PartnerRefresh | None = None,
) -> TrainingState:
    """
    Trains until `settings.max_train_steps` updates (or `num_epochs` epochs), resuming from `state`.

    Each batch (`_Loop.train_batch`): set the loss mode (`set_loss_mode`: sum of violations during the warm-up of
    `warmup_steps` updates, or `sum_violation_warmup_epochs` epochs when it is None, then hardest negatives),
    forward, then `_apply_update` (skip the batch if its loss is not finite on any process, or, at an update, if the
    gradient norm is not finite; backward, clip, step). Each update (`_Loop.finish_update`): step
    the schedule; with a `refresh`, every `refresh.every` updates, new partners for the rest of the epoch (its
    iteration starts again after the batches already drawn); every `eval_steps` updates and at the end of each epoch:
    `validate()` (metrics with `rsum`, the same on every process) and, on a new best rsum, `save_best(metrics)`.
    Checkpoints every `checkpointing_steps` updates (or each epoch) and at the end, after that update's new partners.
    Raises `NonFiniteLossError` after `max_nonfinite_steps` skipped batches in a row, leaving the last checkpoint as it
    was.

    Args:
        model, optimizer, dataloader: prepared by `accelerator` (the dataloader's sampler an `EpochSampler`, its
            batches the model's `forward` arguments); the scheduler is not prepared (it steps once per update) but
            registered for checkpointing, like `state`.
        validate: returns the validation metrics of the current model (called on every process).
        save_best: saves the current model as the best (called on every process).
        refresh: partners mined again every `refresh.every` updates; its sampler must be registered for
            checkpointing (`accelerator.register_for_checkpointing`), so that a resumed run has the same partners.
    """
    return _Loop(accelerator, model, optimizer, scheduler, dataloader, state, settings, validate, save_best, log,
                 refresh).run()


class _Loop:
    """What `train_loop` works with and keeps between batches: its arguments, the progress bar, the finite losses
    since the last log record, the steps of the last validation and checkpoint, and whether new partners replaced the
    sampler's since the epoch's iteration began."""

    def __init__(self, accelerator, model, optimizer, scheduler, dataloader, state: TrainingState,
                 settings: LoopSettings, validate: Callable[[], dict], save_best: Callable[[dict], None],
                 log: TrainingLog, refresh: PartnerRefresh | None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.dataloader, self.unwrapped = dataloader, accelerator.unwrap_model(model)
        self.state, self.settings, self.validate, self.save_best, self.log = state, settings, validate, save_best, log
        self.refresh = refresh
        updates_per_epoch = math.ceil(len(dataloader) / accelerator.gradient_accumulation_steps)
        self.max_steps = settings.max_train_steps or settings.num_epochs * updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / updates_per_epoch)
        self.warmup_steps = settings.warmup_steps
        if self.warmup_steps is None:
            self.warmup_steps = round(settings.sum_violation_warmup_epochs * updates_per_epoch)
        self.progress = progress_bar(total=self.max_steps, initial=state.global_step, desc="training",
                                     disable=not accelerator.is_local_main_process)
        self.window = []  # finite losses since the last log record
        self.warned_collapse = False
        self.last_validation = self.last_checkpoint = None
        self.partners_replaced = False

    def run(self) -> TrainingState:
        """The epochs from `state` on (a resumed one from its next batch), then the last validation and checkpoint."""
        state, accelerator, dataloader = self.state, self.accelerator, self.dataloader
        self.model.train()
        while state.global_step < self.max_steps and state.epoch < self.num_epochs:
            dataloader.set_epoch(state.epoch)
            skipped = state.batches_in_epoch
            batches = accelerator.skip_first_batches(dataloader, skipped) if skipped else dataloader
            self.partners_replaced = False
            for batch in batches:
                outputs, max_violation = self.train_batch(batch)
                if not accelerator.sync_gradients:
                    continue
                self.finish_update(outputs, max_violation)
                if state.global_step >= self.max_steps:
                    break
                if self.partners_replaced and state.batches_in_epoch < len(dataloader):
                    break  # the rest of the epoch in the new partners' order
            else:  # the epoch ran to its end
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if self.last_validation != state.global_step:
                    self.run_validation()
                if self.settings.checkpointing_steps == "epoch":
                    self.checkpoint()

        if self.last_validation != state.global_step:
            self.run_validation()
        if self.last_checkpoint != state.global_step:
            self.checkpoint()
        self.progress.close()
        return state

    def train_batch(self, batch):
        """One batch: the loss mode of the current update (`set_loss_mode`), forward and `_apply_update`; a finite
        loss joins the window of the next log record, a skipped batch is counted. Returns (outputs, loss mode)."""
        state, settings = self.state, self.settings
        state.batches_in_epoch += 1
        max_violation = set_loss_mode(self.unwrapped, state.global_step, self.warmup_steps)
        with self.accelerator.accumulate(self.model):
            outputs = self.model(**batch, return_loss=True)
            counted = _apply_update(self.accelerator, self.model, self.optimizer, outputs.loss, state,
                                    settings.grad_clip)
        if counted:
            state.nonfinite_in_row = 0
            self.window.append(outputs.loss.item())
        else:
            self.count_skipped()
        return outputs, max_violation

    def count_skipped(self):
        """Counts a skipped batch, warns, and raises `NonFiniteLossError` after `max_nonfinite_steps` in a row."""
        state = self.state
        state.nonfinite_steps += 1
        state.nonfinite_in_row += 1
        warnings.warn(f"Non-finite loss or gradient at step {state.global_step}: batch skipped "
                      f"({state.nonfinite_in_row} in a row, {state.nonfinite_steps} in total).")
        if state.nonfinite_in_row >= self.settings.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} consecutive batches had a non-finite loss or gradient (step "
                f"{state.global_step}); training stopped. The last checkpoint in "
                f"{os.path.join(self.settings.output_dir, CHECKPOINTS_DIR)} is intact: lower the learning rate "
                f"or use --mixed_precision no, then resume with --resume_from_checkpoint latest."
            )

    def finish_update(self, outputs, max_violation: bool):
        """After an optimizer update: count it, step the schedule, then the log record, new partners, validation and
        checkpoint that fall on this step."""
        state, settings = self.state, self.settings
        state.global_step += 1
        self.scheduler.step()
        self.progress.update(1)
        if state.global_step % settings.logging_steps == 0 or state.global_step == self.max_steps:
            self.log_training(outputs, max_violation)
        if self.refresh and state.global_step % self.refresh.every == 0 and state.global_step < self.max_steps:
            self.replace_partners()
        if settings.eval_steps and state.global_step % settings.eval_steps == 0:
            self.run_validation()
        if isinstance(settings.checkpointing_steps, int) and state.global_step % settings.checkpointing_steps == 0:
            self.checkpoint()

    def log_training(self, outputs, max_violation: bool):
        """The record of the updates since the last one (their mean finite loss over processes, the learning rate, the
        loss mode, the counters of skipped batches and the fp16 loss scale) to the log file, the trackers and the
        progress bar; a warning the first time the batch's scores have collapsed to one value."""
        state, accelerator, scaler = self.state, self.accelerator, getattr(self.accelerator, "scaler", None)
        losses, self.window = self.window or [math.nan], []
        mean_loss = torch.tensor(sum(losses) / len(losses), device=outputs.loss.device)
        mean_loss = accelerator.reduce(mean_loss, "mean").item()
        learning_rate = self.scheduler.get_last_lr()[0]
        self.log.write({
            "step": state.global_step, "epoch": state.epoch, "loss": None if math.isnan(mean_loss) else mean_loss,
            "lr": learning_rate, "max_violation": max_violation,
            "nonfinite_steps": state.nonfinite_steps, "overflow_steps": state.overflow_steps,
            **({} if scaler is None else {"loss_scale": scaler.get_scale()}),
        })
        accelerator.log({"train/loss": mean_loss, "train/lr": learning_rate}, step=state.global_step)
        self.progress.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
        if not self.warned_collapse and outputs.logits_per_image.detach().float().std() < 1e-6:
            self.warned_collapse = True
            warnings.warn(
                f"Step {state.global_step}: every pair of the batch has the same score, so the triplet loss has no "
                "gradient (collapsed, saturated scores). Consider a longer --warmup_steps, a lower learning rate or "
                "--set max_violation=false; the best model saved so far is kept."
            )

    def replace_partners(self):
        """`refresh.mine()` replaces the sampler's partners after the batches drawn so far in the epoch (by every
        process); the log records the share of images whose partner stayed the same."""
        state, sampler = self.state, self.refresh.sampler
        previous, partners = sampler.partners, self.refresh.mine()
        # the position in the epoch's order: the batches of every process drawn so far
        sampler.replace_partners(partners, state.batches_in_epoch * self.dataloader.total_batch_size)
        self.partners_replaced = True
        kept = sum(old == new for old, new in zip(previous, partners)) / max(len(partners), 1)
        self.log.write({"step": state.global_step, "epoch": state.epoch, "partners_kept": kept})

    def run_validation(self):
        """`validate()` with the buffers synced; logs the metrics and, on a new best rsum, `save_best`."""
        state = self.state
        sync_buffers(self.accelerator, self.model)
        metrics = self.validate()
        self.last_validation = state.global_step
        improved = metrics["rsum"] > state.best_rsum
        if improved:
            state.best_rsum, state.best_step = metrics["rsum"], state.global_step
        self.log.write({"step": state.global_step, "epoch": state.epoch, **metrics, "best_rsum": state.best_rsum})
        self.log.plot()
        self.accelerator.log({f"dev/{key}": value for key, value in metrics.items()}, step=state.global_step)
        if improved:
            self.save_best({"step": state.global_step, **metrics})

    def checkpoint(self):
        """`save_checkpoint` of the current step, with the buffers synced."""
        sync_buffers(self.accelerator, self.model)
        save_checkpoint(self.accelerator, self.settings.output_dir, self.state.global_step,
                        self.settings.checkpoints_total_limit)
        self.last_checkpoint = self.state.global_step
