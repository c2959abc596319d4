"""Faults and probes that tests put into the training code from outside (the production code carries no test hooks)."""

import hashlib

import torch

import modeling_mpsm.training as training
from modeling_mpsm.modeling_mpsm import MPSMRetrievalLoss


def nan_losses_at(monkeypatch, steps):
    """Makes the training loss NaN while the loop is at an update of `steps` (0-based `global_step`), as a faulty batch
    would: the loop sets the loss mode once per batch (`training.set_loss_mode`), which tells the update."""
    steps, current = set(steps), {}
    set_loss_mode, loss_forward = training.set_loss_mode, MPSMRetrievalLoss.forward

    def recording_set_loss_mode(model, step, warmup_steps):
        current["step"] = step
        return set_loss_mode(model, step, warmup_steps)

    def nan_forward(self, *args, **kwargs):
        loss = loss_forward(self, *args, **kwargs)
        return loss * float("nan") if current.get("step") in steps else loss

    monkeypatch.setattr(training, "set_loss_mode", recording_set_loss_mode)
    monkeypatch.setattr(MPSMRetrievalLoss, "forward", nan_forward)


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values), to compare weights across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
