"""Checkpoints saved by an earlier layout of the package (tests/fixtures/checkpoint_v0: the tiny dis model and its
dis + dir ensemble with their processor, saved before the package was reorganised) still load and score the same."""

import json
import os

import pytest
import torch

from modeling_mpsm import MPSMEnsembleModel, MPSMModel, MPSMProcessor


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v0")


@pytest.mark.parametrize("name, model_class", [("dis", MPSMModel), ("ensemble", MPSMEnsembleModel)])
def test_checkpoint_saved_before_the_reorganisation_scores_as_it_did(name, model_class):
    with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as file:
        expected = json.load(file)
    folder = os.path.join(FIXTURE, name)
    model = model_class.from_pretrained(folder).eval()
    processor = MPSMProcessor.from_pretrained(folder)
    inputs = processor(text=expected["captions"], region_features=torch.tensor(expected["region_features"]),
                       boxes=torch.tensor(expected["boxes"]), return_tensors="pt")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    torch.testing.assert_close(scores, torch.tensor(expected[name]), rtol=1e-5, atol=1e-6)
