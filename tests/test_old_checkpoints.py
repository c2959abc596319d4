"""Checkpoints saved by an earlier layout of the package (tests/fixtures/checkpoint_v0: the tiny dis model and its
dis + dir ensemble with their processor, saved before the package was reorganised) still load and score the same,
also once the perspective table has grown."""

import json
import os

import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.configuration_mpsm import PERSPECTIVES


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


def test_checkpoints_keep_their_perspectives_when_the_table_grows(monkeypatch, tmp_path):
    """An ensemble saved before its configuration stored `members`, and a joint model saved before it stored
    `joint_perspectives`, keep the perspectives of their time when `PERSPECTIVES` grows: a new perspective must not
    give them a freshly initialised member or head."""
    torch.manual_seed(0)
    joint = MPSMModel(MPSMConfig(img_dim=16, vocab_size=13, word_dim=8, embed_size=16, sim_dim=8, similarity="joint"))
    joint.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    assert saved["joint_perspectives"] == ["distance", "direction"]
    del saved["joint_perspectives"]  # as saved before the field existed
    config_file.write_text(json.dumps(saved))

    monkeypatch.setitem(PERSPECTIVES, "angle", "ang")  # a perspective added since
    assert MPSMConfig(similarity="joint").joint_perspectives == ["distance", "direction", "angle"]
    config = MPSMEnsembleConfig.from_pretrained(os.path.join(FIXTURE, "ensemble"))
    assert config.members == ["dis", "dir"] and config.ang_config is None
    test_checkpoint_saved_before_the_reorganisation_scores_as_it_did("ensemble", MPSMEnsembleModel)
    loaded = MPSMModel.from_pretrained(tmp_path)
    assert loaded.config.perspectives == ("distance", "direction")
    assert loaded.state_dict().keys() == joint.state_dict().keys()
    assert all(torch.equal(value, joint.state_dict()[name]) for name, value in loaded.state_dict().items())
