"""benchmarks/kgid_probe.py on a tiny model: every row runs on today's model (the 'every adjacency = I' row broke when
`adaptive_adjacency` gained `real`), the first row is the model's own evaluation, and the rows change what they say."""

import json

import torch

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.evaluation import evaluate_retrieval
from tiny import load_script, tiny_scenes

kgid_probe = load_script("benchmarks/kgid_probe.py")


def test_every_probe_row_runs_and_the_first_is_the_plain_evaluation(tmp_path):
    data_dir, model_dir = tmp_path / "scenes", tmp_path / "model"
    dataset, processor = tiny_scenes(data_dir, num_test=12, feature_dim=16)
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(img_dim=16, vocab_size=len(processor.tokenizer), word_dim=8, embed_size=16, sim_dim=8,
                                 kgid_layers=2, srgr_steps=1, spatial_messages=True))
    with torch.no_grad():  # messages that are not zero, so that switching them off or moving the boxes shows
        model.spatial_messages.message.weight.normal_(0, 0.5)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    output = tmp_path / "probe.json"
    kgid_probe.main(["--model", str(model_dir), "--data_dir", str(data_dir), "--parser", "fallback",
                     "--output_json", str(output)])
    rows = json.loads(output.read_text())
    assert list(rows) == ["trained model", "E = I (layer 0's graph)", "every adjacency = I", "P_v = 1",
                          "boxes of another image", "spatial messages off", "visual KGID removed",
                          "textual KGID removed"]
    reloaded = MPSMModel.from_pretrained(model_dir).eval()
    assert rows["trained model"]["rsum"] == evaluate_retrieval(reloaded, dataset, processor, progress=False)["rsum"]
    assert set(rows["trained model"]["twin_accuracy"]) <= {"binding", "color", "count", "relation"}
    features, boxes = torch.rand(3, 8, 16), torch.rand(3, 8, 2).repeat(1, 1, 2) * torch.tensor([0.5, 0.5, 1, 1])
    plain = reloaded.encode_image(features, boxes).image_embeds
    with kgid_probe.shuffled_boxes(reloaded):
        moved = reloaded.encode_image(features, boxes).image_embeds
    assert not torch.allclose(plain, moved)
