"""The synthetic benchmark: SCAN format, determinism, twin captions and features that carry the scene, for the default
`people` grammar and the older `objects` grammar (a control)."""

import collections
import json
import re

import numpy as np
import pytest

from modeling_mpsm.data import oracles, scenes_objects, scenes_people, synthetic


SIZES = {"num_train": 100, "num_dev": 10, "num_test": 40, "feature_dim": 32}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The older `objects` grammar."""
    path = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--output_dir", str(path), "--seed", "3", "--grammar", "objects"]
                   + [f"--{k}={v}" for k, v in SIZES.items()])
    return path


@pytest.fixture(scope="module")
def people_dir(tmp_path_factory):
    """The default grammar, large enough for the oracle readers (1024-d features, as the main job's)."""
    path = tmp_path_factory.mktemp("people")
    synthetic.main(["--output_dir", str(path), "--seed", "3", "--num_train", "40", "--num_dev", "10", "--num_test", "400",
                    "--feature_dim", "1024"])
    return path


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def test_deterministic_for_a_seed(data_dir, tmp_path):
    synthetic.generate(str(tmp_path), seed=3, grammar="objects", **SIZES)
    files = sorted(p.name for p in data_dir.iterdir())
    assert files == sorted(p.name for p in tmp_path.iterdir())
    for name in files:
        assert (data_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other = tmp_path / "other"
    synthetic.generate(str(other), seed=4, grammar="objects", **SIZES)
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
        scene = scenes_objects.sample_scene(rng)
        plan = scenes_objects.sample_plan(rng, scene)
        used.add(plan["template"])
        assert scenes_objects.render(scene, plan)[0].isupper()
    assert len(scenes_objects.TEMPLATES) >= 20 and len(used) >= 20


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
    assert differing & set(scenes_objects.ALL_COLORS) and differing & {"left", "right", "above", "below"}


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
            before = scenes_objects.relation(*(scenes_objects.Entity(**a["entities"][k]) for k in (i, j)), a["width"],
                                             a["height"])
            after = scenes_objects.relation(*(scenes_objects.Entity(**b["entities"][k]) for k in (i, j)), b["width"],
                                            b["height"])
            assert after == scenes_objects.RELATIONS[before] != before


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
    assert accuracy > 10 / len(scenes_objects.CLASS_NAMES)  # chance is 1 / 25


def test_position_only_in_the_boxes(data_dir, tmp_path):
    """--position_code_weight 0: the same scenes, captions and boxes, but region features without the box's position
    code (as pooled BUTD features carry little absolute position): only the spatial prior P_v sees geometry."""
    synthetic.generate(str(tmp_path), seed=3, grammar="objects", position_code_weight=0.0, **SIZES)
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


def test_twin_accuracy_reads_only_the_captions_that_mention_the_change():
    """With `focus_captions` recorded, only those captions count: image 0's focused captions 1 and 3 beat its twin
    (2 of 2), image 1's focused caption 0 does not (0 of 1)."""
    scenes = [{"twin": 1, "change": {"kind": "binding"}, "focus_captions": [1, 3]},
              {"twin": 0, "change": {"kind": "binding"}, "focus_captions": [0]}]
    scores = np.zeros((2, 10))
    scores[0, [1, 3]] = 1.0
    scores[0, 5] = 1.0  # image 1's caption 0 scores higher on image 0
    scores[1, 0] = 1.0  # an unfocused caption of image 0 that prefers the twin: not counted
    assert synthetic.twin_accuracy(scores, scenes) == {"binding": pytest.approx(200 / 3)}


# The default grammar: people and animals with their items ----------------------------------------------------------


def test_people_scenes_are_the_default_and_write_the_scan_format(people_dir):
    meta = json.loads((people_dir / "meta.json").read_text())
    assert meta["grammar"] == "people" and "position_code_weight" not in meta
    ims = np.load(people_dir / "test_ims.npy", mmap_mode="r")
    assert ims.shape == (400, 36, 1024) and (np.asarray(ims[:5]) >= 0).all()
    captions = (people_dir / "test_caps.txt").read_text().splitlines()
    assert len(captions) == 2000 and all(c[0].isupper() and c.endswith(".") for c in captions)
    with pytest.raises(ValueError, match="position_code_weight"):
        synthetic.generate(str(people_dir / "x"), position_code_weight=0.3, num_train=2, num_dev=2, num_test=2)


def test_people_twins_differ_in_one_thing_and_their_focused_captions_say_it(people_dir):
    scenes = json.loads((people_dir / "test_scenes.json").read_text())
    captions = (people_dir / "test_caps.txt").read_text().splitlines()
    kinds = collections.Counter()
    for a in scenes[::2]:
        if a["twin"] < 0:
            continue
        b = scenes[a["twin"]]
        kind, target = a["change"]["kind"], a["change"]["target"]
        kinds[kind] += 1
        assert b["change"] == a["change"] and len(a["focus_captions"]) == scenes_people.FOCUS_CAPTIONS
        if kind == "binding":  # the same bag of (item, colour); the two owners' items exchanged their colours
            items = lambda s: sorted((t["name"], t["color"]) for t in s["things"] if t["owner"] >= 0)  # noqa: E731
            assert items(a) == items(b)
            first, second = (a["things"][k] for k in target)
            assert first["name"] == second["name"] and first["color"] != second["color"]
            assert [b["things"][k]["color"] for k in target] == [second["color"], first["color"]]
            assert a["things"][first["owner"]]["name"] != a["things"][second["owner"]]["name"]
        elif kind == "color":
            assert a["things"][target]["color"] != b["things"][target]["color"]
            assert b["things"][target]["color"] not in {t["color"] for t in a["things"]}
        elif kind == "count":
            assert {len(a["groups"][target]), len(b["groups"][target])} == {2, 3}
        for image in (a, b):
            for position, claim in zip(image["focus_captions"], image["claims"]):
                text = captions[5 * image["image_id"] + position].lower()
                if kind == "binding":
                    assert f"{claim['owner']} {scenes_people.ITEMS[claim['item']][1]} a {claim['color']} {claim['item']}" in text
                elif kind == "count":
                    assert f"{scenes_people.COUNT_WORDS[claim['count']]} {scenes_people.OWNERS[claim['thing']]}" in text
                elif kind == "relation":
                    assert claim["relation"] in text
    assert kinds["binding"] > kinds["color"] > kinds["relation"] and kinds["count"] > kinds["relation"]


def test_an_owner_region_carries_its_item_colour_in_proportion_to_the_item_share():
    """Hand-made scene: a man's box whose shirt covers exactly its upper half (on the painting grid); the man's box
    pools half shirt (class 0.5, red 0.5 * COLOR_WEIGHT) and half man; the shirt's own box is all shirt."""
    width, height = 640, 480
    man = scenes_people.Thing("man", None, (100.0, 100.0, 200.0, 300.0), group=0)
    shirt = scenes_people.Thing("shirt", "red", (100.0, 100.0, 200.0, 200.0), owner=0)
    scene = scenes_people.Scene(width, height, "grass", "sky", [man, shirt], [[0]])
    basis = scenes_people.FeatureBasis(np.random.default_rng(0), 16)
    recipe, coverage = scenes_people.pooled_recipes(scene, np.array([man.box, shirt.box]), basis)
    red, man_row, shirt_row = (basis.index("color", "red"), basis.index("class", "man"), basis.index("class", "shirt"))
    assert recipe[0, red] == pytest.approx(0.5 * scenes_people.COLOR_WEIGHT, abs=0.03)
    assert recipe[0, man_row] == pytest.approx(0.5, abs=0.03) and recipe[0, shirt_row] == pytest.approx(0.5, abs=0.03)
    assert recipe[1, red] == pytest.approx(scenes_people.COLOR_WEIGHT) and recipe[1, man_row] == 0
    assert coverage.sum(1) == pytest.approx([1.0, 1.0])


def test_people_region_features_carry_no_absolute_position(people_dir):
    """A ridge read-out of box centres from the region features explains little of them (the objects grammar's
    position code made R² about 0.8)."""
    features = np.asarray(np.load(people_dir / "test_ims.npy", mmap_mode="r")[:200]).reshape(-1, 1024)
    boxes = np.load(people_dir / "test_ims_bbx.npy")[:200].reshape(-1, 4)
    sizes = np.repeat(np.load(people_dir / "test_ims_size.npy")[:200], 36, axis=0)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / sizes[:, 0], (boxes[:, 1] + boxes[:, 3]) / 2 / sizes[:, 1]], 1)
    half = len(features) // 2
    x = np.concatenate([features, np.ones((len(features), 1))], 1)
    weights = np.linalg.solve(x[:half].T @ x[:half] + 10.0 * np.eye(x.shape[1]), x[:half].T @ centres[:half])
    residual = ((x[half:] @ weights - centres[half:]) ** 2).sum(0)
    r2 = 1 - residual / ((centres[half:] - centres[half:].mean(0)) ** 2).sum(0)
    assert r2[0] < 0.2  # horizontal position, which relations and binding need


def test_count_instances_merges_duplicates_and_parts():
    boxes = np.array([[0, 0, 10, 20], [1, 1, 11, 21], [0, 0, 10, 10],  # one instance, a duplicate and a part
                      [30, 0, 40, 20], [31, 2, 40, 20]], dtype=np.float32)  # a second instance and its duplicate
    assert oracles.count_instances(boxes) == 2


def test_oracles_geometry_decides_binding(people_dir):
    """The scenes' check: with boxes, binding twins are read; from the bag of regions, much less; directional
    relations not at all without boxes."""
    accuracy = oracles.oracle_twin_accuracy(str(people_dir), "test")
    bag, box = accuracy["bag of regions"], accuracy["regions with boxes"]
    assert box["binding"] >= 95 and bag["binding"] <= box["binding"] - 15
    assert bag["relation"] == 50.0 and box["color"] >= 90 and bag["color"] >= 90
