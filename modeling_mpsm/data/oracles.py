"""What the `people` scenes let a reader tell apart, without training: two oracle readers of the written files.

Both readers see what a model sees (the region features, and for one of them the boxes), plus two things a model must
learn: the class of each region (`{split}_region_labels.npy`, a perfect detector) and the generator's colour
directions (`FeatureBasis`, rebuilt from the seed), with which a region's colour evidence is the least-squares
coefficient of that colour in its feature. For each caption that mentions a twin change, a reader scores the caption's
claim (`claims` in `{split}_scenes.json`) on the image and on its twin and picks the higher (a tie counts one half):
- the *bag reader* sees the regions without their boxes: an owner's item colour only through the owner's own regions,
  which carry it in proportion to the item's share of the box; no position at all;
- the *box reader* uses the boxes: an item region belongs to the owner region that holds most of it; instances are
  counted by merging overlapping boxes; sides are read from box centres.
Binding twins are the test of the scenes: the box reader must read them, the bag reader much less.

    python -m modeling_mpsm.data.oracles --data_dir DIR [--split test]
"""

import argparse
import json
import os

import numpy as np

from . import scenes_people


READERS = ("bag of regions", "regions with boxes")


def _area(boxes):
    return (boxes[..., 2] - boxes[..., 0]).clip(0) * (boxes[..., 3] - boxes[..., 1]).clip(0)


def _intersection(a, b):
    """Areas of intersection of every box of `a` [n, 4] with every box of `b` [m, 4] -> [n, m]."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return _area(np.concatenate([top_left, bottom_right], -1))


def count_instances(boxes, overlap=0.6):
    """Greedy merging, largest box first: a box that lies mostly (> `overlap` of its area) inside a kept box is the
    same instance (a jittered duplicate or a part) -> number of boxes kept."""
    order = np.argsort(-_area(boxes))
    kept = []
    for k in order:
        if kept and (_intersection(boxes[k : k + 1], boxes[kept])[0] / _area(boxes[k]) > overlap).any():
            continue
        kept.append(k)
    return len(kept)


class Image:
    """One image's regions as a reader sees them: colour evidence [R, C], boxes [R, 4], class labels [R]."""

    def __init__(self, features, boxes, labels, color_rows):
        self.colors = features @ np.linalg.pinv(color_rows)  # least-squares colour coefficients
        self.boxes, self.labels = boxes, labels

    def regions(self, name):
        return np.flatnonzero(self.labels == scenes_people.CLASS_NAMES.index(name))

    def color(self, regions, color):
        return self.colors[regions, scenes_people.COLORS.index(color)]


def bag_evidence(image: Image, claim: dict) -> float:
    """How well the image fits the claim, from the bag of regions (labels and features, no boxes)."""
    kind = claim["kind"]
    if kind == "binding":  # the owner's own regions carry a share of its item's colour
        owners = image.regions(claim["owner"])
        return float(image.color(owners, claim["color"]).mean()) if owners.size else 0.0
    if kind == "color":
        things = image.regions(claim["thing"])
        return float(image.color(things, claim["color"]).max()) if things.size else 0.0
    if kind == "count":  # more regions of the class, more instances: regions per instance are about 2.5
        return -abs(image.regions(claim["thing"]).size / 2.5 - claim["count"])
    return 0.0  # relation: no position without boxes


def box_evidence(image: Image, claim: dict) -> float:
    """How well the image fits the claim, using the boxes too."""
    kind = claim["kind"]
    if kind == "binding":  # the item regions that lie mostly inside a region of the named owner
        items, owners = image.regions(claim["item"]), np.flatnonzero(np.isin(
            image.labels, [scenes_people.CLASS_NAMES.index(name) for name in scenes_people.OWNERS]))
        if not items.size or not owners.size:
            return 0.0
        held = _intersection(image.boxes[items], image.boxes[owners]) / _area(image.boxes[items])[:, None]
        holder = image.labels[owners[held.argmax(1)]]
        mine = items[holder == scenes_people.CLASS_NAMES.index(claim["owner"])]
        return float(image.color(mine, claim["color"]).mean()) if mine.size else 0.0
    if kind == "count":
        return -abs(count_instances(image.boxes[image.regions(claim["thing"])]) - claim["count"])
    if kind == "relation":
        subject, other = image.regions(claim["subject"]), image.regions(claim["object"])
        if not subject.size or not other.size:
            return 0.0
        centre = lambda regions: float((image.boxes[regions, 0] + image.boxes[regions, 2]).mean())  # noqa: E731
        side = centre(other) - centre(subject)
        return side if claim["relation"] == "to the left of" else -side
    return bag_evidence(image, claim)


def oracle_twin_accuracy(data_dir: str, split: str = "test") -> dict[str, dict[str, float]]:
    """Per reader (`READERS`) and kind of twin change, % of the focused captions whose claim the reader scores higher
    on their own image than on its twin (ties one half)."""
    with open(os.path.join(data_dir, "meta.json")) as file:
        meta = json.load(file)
    if meta.get("grammar") != "people":
        raise ValueError(f"the oracle readers read the 'people' scenes; {data_dir} holds {meta.get('grammar')!r}")
    basis = scenes_people.FeatureBasis(np.random.default_rng(meta["seed"]), meta["feature_dim"])
    start = basis.offsets["color"]
    color_rows = basis.matrix[start : start + len(scenes_people.COLORS)]
    features = np.load(os.path.join(data_dir, f"{split}_ims.npy"), mmap_mode="r")
    boxes = np.load(os.path.join(data_dir, f"{split}_ims_bbx.npy"))
    labels = np.load(os.path.join(data_dir, f"{split}_region_labels.npy"))
    with open(os.path.join(data_dir, f"{split}_scenes.json")) as file:
        scenes = json.load(file)
    images = {}

    def image(index):
        if index not in images:
            images[index] = Image(np.asarray(features[index]), boxes[index], labels[index], color_rows)
        return images[index]

    wins = {reader: {} for reader in READERS}
    for index, scene in enumerate(scenes):
        if scene["twin"] < 0:
            continue
        for claim in scene["claims"]:
            for reader, evidence in zip(READERS, (bag_evidence, box_evidence)):
                own, twin = evidence(image(index), claim), evidence(image(scene["twin"]), claim)
                wins[reader].setdefault(claim["kind"], []).append(1.0 if own > twin else 0.5 if own == twin else 0.0)
    return {reader: {kind: 100.0 * float(np.mean(v)) for kind, v in sorted(kinds.items())}
            for reader, kinds in wins.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    accuracy = oracle_twin_accuracy(args.data_dir, args.split)
    kinds = sorted({kind for reader in accuracy.values() for kind in reader})
    print(f"{'reader':<22}" + "".join(f"{kind:>10}" for kind in kinds))
    for reader, values in accuracy.items():
        print(f"{reader:<22}" + "".join(f"{values.get(kind, float('nan')):>10.1f}" for kind in kinds))


if __name__ == "__main__":
    main()
