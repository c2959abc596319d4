"""The synthetic benchmark: SCAN format, determinism, twin captions and features that carry the scene."""

import collections
import json
import re

import numpy as np
import pytest

from modeling_mpsm.data import synthetic


SIZES = {"num_train": 100, "num_dev": 10, "num_test": 40, "feature_dim": 32}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--output_dir", str(path), "--seed", "3"] + [f"--{k}={v}" for k, v in SIZES.items()])
    return path


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def test_deterministic_for_a_seed(data_dir, tmp_path):
    synthetic.generate(str(tmp_path), seed=3, **SIZES)
    files = sorted(p.name for p in data_dir.iterdir())
    assert files == sorted(p.name for p in tmp_path.iterdir())
    for name in files:
        assert (data_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other = tmp_path / "other"
    synthetic.generate(str(other), seed=4, **SIZES)
    assert (other / "test_caps.txt").read_bytes() != (data_dir / "test_caps.txt").read_bytes()


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_scan_format(data_dir, split):
    n = SIZES[f"num_{split}"]
    ims = np.load(data_dir / f"{split}_ims.npy")
    boxes = np.load(data_dir / f"{split}_ims_bbx.npy")
    sizes = np.load(data_dir / f"{split}_ims_size.npy")
    assert ims.shape == (n, 36, 32) and ims.dtype == np.float32 and (ims >= 0).all()
    assert boxes.shape == (n, 36, 4) and boxes.dtype == np.float32
    assert sizes.shape == (n, 2)
    captions = (data_dir / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 5 * n and all(words(c) for c in captions)
    # boxes agree with the image sizes
    w, h = sizes[:, None, 0], sizes[:, None, 1]
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] >= 0).all()
    assert (boxes[..., 2] <= w).all() and (boxes[..., 3] <= h).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["num_images"][split] == n and meta["feature_dim"] == 32


def test_captions_use_many_templates(tmp_path):
    rng = np.random.default_rng(0)
    used = set()
    for _ in range(200):
        scene = synthetic.sample_scene(rng)
        plan = synthetic.sample_plan(rng, scene)
        used.add(plan["template"])
        assert synthetic.render(scene, plan)[0].isupper()
    assert len(synthetic.TEMPLATES) >= 20 and len(used) >= 20


def test_a_third_of_test_captions_have_a_one_word_twin(data_dir):
    """Computed from the captions alone: another image has a caption differing in exactly one word."""
    captions = [words(c) for c in (data_dir / "test_caps.txt").read_text().splitlines()]
    others = collections.defaultdict(set)  # caption with one word blanked -> {(image, blanked word)}
    for index, caption in enumerate(captions):
        for p in range(len(caption)):
            others[tuple(caption[:p]), tuple(caption[p + 1 :])].add((index // 5, caption[p]))

    def has_twin(index, caption):
        return any(
            image != index // 5 and word != caption[p]
            for p in range(len(caption))
            for image, word in others[tuple(caption[:p]), tuple(caption[p + 1 :])]
        )

    twins = sum(has_twin(i, c) for i, c in enumerate(captions))
    assert twins >= len(captions) / 3
    differing = {w for i, c in enumerate(captions) for p, w in enumerate(c) if has_twin(i, c)}
    assert differing & set(synthetic.ALL_COLORS) and differing & {"left", "right", "above", "below"}


def test_classes_recur_across_images(data_dir):
    scenes = json.loads((data_dir / "test_scenes.json").read_text())
    counts = collections.Counter(e["name"] for s in scenes for e in s["entities"])
    assert len(counts) >= 15 and max(counts.values()) >= 4


def test_twin_scenes_differ_in_one_thing(data_dir):
    scenes = json.loads((data_dir / "test_scenes.json").read_text())
    for a in scenes[::2]:
        b = scenes[a["twin"]]
        assert b["twin"] == a["image_id"] and a["change"] == b["change"]
        if a["change"]["kind"] in ("color", "material", "count", "size"):
            k, kind = a["change"]["target"], a["change"]["kind"]
            changed = [key for key in ("color", "material", "count", "size") if a["entities"][k][key] != b["entities"][k][key]]
            assert changed == [kind]
        else:
            i, j = a["change"]["target"]
            before = synthetic.relation(*(synthetic.Entity(**a["entities"][k]) for k in (i, j)), a["width"], a["height"])
            after = synthetic.relation(*(synthetic.Entity(**b["entities"][k]) for k in (i, j)), b["width"], b["height"])
            assert after == synthetic.RELATIONS[before] != before


def test_region_features_carry_the_object_class(data_dir):
    """Class prototypes estimated on train classify test object regions far above chance."""

    def object_regions(split):
        features = np.load(data_dir / f"{split}_ims.npy").reshape(-1, 32)
        labels = np.load(data_dir / f"{split}_region_labels.npy").reshape(-1)
        return features[labels >= 0], labels[labels >= 0]

    train_x, train_y = object_regions("train")
    test_x, test_y = object_regions("test")
    classes = np.unique(train_y)
    prototypes = np.stack([train_x[train_y == c].mean(0) for c in classes])
    distances = ((test_x[:, None, :] - prototypes[None]) ** 2).sum(-1)
    predicted = classes[distances.argmin(1)]
    known = np.isin(test_y, classes)
    accuracy = (predicted[known] == test_y[known]).mean()
    assert accuracy > 10 / len(synthetic.CLASS_NAMES)  # chance is 1 / 25


def test_position_only_in_the_boxes(data_dir, tmp_path):
    """--position_code_weight 0: the same scenes, captions and boxes, but region features without the box's position
    code (as pooled BUTD features carry little absolute position): only the spatial prior P_v sees geometry."""
    synthetic.generate(str(tmp_path), seed=3, position_code_weight=0.0, **SIZES)
    for name in ("train_caps.txt", "train_ims_bbx.npy", "train_scenes.json"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes(), name
    assert not np.array_equal(np.load(tmp_path / "train_ims.npy"), np.load(data_dir / "train_ims.npy"))
    assert json.loads((tmp_path / "meta.json").read_text())["position_code_weight"] == 0.0


def test_twin_accuracy_counts_captions_that_prefer_their_own_image_per_change():
    """Images 0 and 1 are colour twins, 2 and 3 relation twins, 4 has none (ignored). Scores: image 0's captions all
    beat image 1 (5 of 5), image 1's captions 2 of 5; images 2 and 3 tie everywhere (ties do not count as wins)."""
    scenes = [{"twin": 1, "change": {"kind": "color"}}, {"twin": 0, "change": {"kind": "color"}},
              {"twin": 3, "change": {"kind": "relation"}}, {"twin": 2, "change": {"kind": "relation"}},
              {"twin": -1, "change": {}}]
    scores = np.zeros((5, 25))
    scores[0, 0:5] = 1.0  # image 0 over image 1 on its captions
    scores[1, 5:7] = 1.0  # image 1 over image 0 on two of its captions
    accuracy = synthetic.twin_accuracy(scores, scenes)
    assert accuracy == {"color": pytest.approx(70.0), "relation": 0.0}
