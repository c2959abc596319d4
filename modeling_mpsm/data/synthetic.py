"""Synthetic fine-grained retrieval benchmark in the SCAN/GSMN precomputed-feature format.

Two scene grammars, each generating images in *twin pairs* (two images that differ by one change, whose captions
differ where the change is mentioned) with five captions per image:
- `people` (the default, `scenes_people`): people and animals with the items they wear and hold, counts, places and
  rare directional relations, at the rates real Flickr30K captions use them (docs/caption_statistics.md); twins by
  binding (two owners exchange their items' colours), colour, count and relation; no absolute position in the
  region features.
- `objects` (`scenes_objects`): the older grammar of objects with attributes, counts and directional relations,
  kept as a control row.

Region features imitate BUTD bottom-up attention: `R` regions per image, `relu(recipe @ basis + noise)`, where the
basis rows are class, background and attribute prototypes (see each grammar).

Files written per split (`train`, `dev`, `test`), `N` images, `R` regions, feature size `D`:

- `{split}_ims.npy`: float32 `[N, R, D]` region features
- `{split}_caps.txt`: `5 * N` captions, five consecutive lines per image, in image order
- `{split}_ims_bbx.npy`: float32 `[N, R, 4]` region boxes `(x1, y1, x2, y2)` in pixels
- `{split}_ims_size.npy`: int32 `[N, 2]` image `(w, h)`
- `{split}_region_labels.npy`: int16 `[N, R]` class index of object regions, -1 for background
- `{split}_scenes.json`: the scenes, their twin, the change that makes them twins and which captions mention it
- `meta.json`: the generator settings, class and attribute vocabularies

Usage: `python -m modeling_mpsm.data.synthetic --output_dir DIR [--grammar people --seed 0 --num_train 3000]`.
"""

import argparse
import json
import os

import numpy as np

from ..common import CAPTIONS_PER_IMAGE, atomic_write, atomic_write_text, progress_bar
from . import scenes_objects, scenes_people


GRAMMARS = {"people": scenes_people, "objects": scenes_objects}
SPLITS = ("train", "dev", "test")


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as file:
            np.save(file, array)

    atomic_write(path, write)


def scene_captions(grammar, rng, scene, shared_plans: list[dict]) -> list[str]:
    """Five captions of `scene` in random order: the plans shared with its twin (which mention the change) and fresh
    ones. Records in `scene.focus_captions` where the shared ones landed, and, for grammars that state them, what each
    says about the change (`scene.claims`)."""
    plans = shared_plans + [grammar.sample_plan(rng, scene) for _ in range(CAPTIONS_PER_IMAGE - len(shared_plans))]
    order = rng.permutation(CAPTIONS_PER_IMAGE)
    scene.focus_captions = [position for position, k in enumerate(order) if k < len(shared_plans)]
    if hasattr(grammar, "claim"):
        scene.claims = [grammar.claim(scene, plans[order[position]]) for position in scene.focus_captions]
    return [grammar.render(scene, plans[k]) for k in order]


def generate_scenes(grammar, rng, num_images: int) -> tuple[list, list[str]]:
    """`num_images` scenes of `grammar` in twin pairs (a last odd image has no twin) and their `5 * num_images`
    captions; `grammar.FOCUS_CAPTIONS` captions of each twin render the plans the pair shares."""
    scenes, captions = [], []
    while len(scenes) < num_images:
        base = grammar.sample_base(rng)
        if len(scenes) + 1 == num_images:
            scenes.append(base)
            captions += scene_captions(grammar, rng, base, [])
            break
        twin = grammar.make_twin(rng, base)
        base.twin, twin.twin = len(scenes) + 1, len(scenes)
        base.change = twin.change
        plans = [grammar.sample_plan(rng, base, twin.change) for _ in range(grammar.FOCUS_CAPTIONS)]
        scenes += [base, twin]
        captions += scene_captions(grammar, rng, base, plans) + scene_captions(grammar, rng, twin, plans)
    return scenes, captions


def write_split(output_dir: str, split: str, num_images: int, rng, grammar, basis, num_regions: int,
                region_options: dict, chunk_size: int = 128) -> None:
    """Generate one split of `grammar` (a module of `GRAMMARS`) and write its files (see the module docstring)."""
    scenes, captions = generate_scenes(grammar, rng, num_images)
    feature_dim = basis.matrix.shape[1]
    boxes = np.zeros((num_images, num_regions, 4), dtype=np.float32)
    labels = np.zeros((num_images, num_regions), dtype=np.int16)

    def write_features(tmp: str) -> None:
        features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_images, num_regions, feature_dim))
        for start in progress_bar(range(0, num_images, chunk_size), desc=f"{split} features", unit="chunk"):
            stop = min(start + chunk_size, num_images)
            recipes, noises = [], []
            for i in range(start, stop):
                recipe, noise, boxes[i], labels[i] = grammar.scene_regions(rng, scenes[i], basis, num_regions, **region_options)
                recipes.append(recipe)
                noises.append(noise)
            recipe, noise = np.concatenate(recipes), np.concatenate(noises)
            chunk = recipe @ basis.matrix
            chunk += rng.standard_normal(chunk.shape, dtype=np.float32) * noise[:, None]
            np.maximum(chunk, 0, out=chunk)  # BUTD features are post-ReLU
            features[start:stop] = chunk.reshape(stop - start, num_regions, feature_dim)
        features.flush()
        del features

    atomic_write(os.path.join(output_dir, f"{split}_ims.npy"), write_features)
    sizes = np.array([[s.width, s.height] for s in scenes], dtype=np.int32)
    for name, array in (("ims_bbx", boxes), ("ims_size", sizes), ("region_labels", labels)):
        _save_npy(os.path.join(output_dir, f"{split}_{name}.npy"), array)
    atomic_write_text(os.path.join(output_dir, f"{split}_caps.txt"), "".join(c + "\n" for c in captions))
    records = [{"image_id": i} | grammar.scene_record(scene) for i, scene in enumerate(scenes)]
    atomic_write_text(os.path.join(output_dir, f"{split}_scenes.json"), json.dumps(records, indent=1))


def generate(output_dir: str, seed: int = 0, num_train: int = 3000, num_dev: int = 200, num_test: int = 1000,
             feature_dim: int = 2048, num_regions: int = 36, grammar: str = "people",
             position_code_weight: float | None = None) -> dict:
    """Write the train/dev/test splits and `meta.json` to `output_dir`; same arguments give byte-identical files.
    `position_code_weight` (the `objects` grammar only, default 0.3) scales a Fourier code of the box's absolute
    position inside each region feature.

    Returns the settings written to `meta.json`.
    """
    if grammar not in GRAMMARS:
        raise ValueError(f"`grammar` must be one of {sorted(GRAMMARS)}, got {grammar!r}")
    if position_code_weight is not None and grammar != "objects":
        raise ValueError("`position_code_weight` is a setting of the 'objects' grammar: the 'people' grammar's region "
                         "features carry no absolute position")
    region_options = {"position_code_weight": 0.3 if position_code_weight is None else position_code_weight} \
        if grammar == "objects" else {}
    module = GRAMMARS[grammar]
    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    basis = module.FeatureBasis(rng, feature_dim)
    counts = {"train": num_train, "dev": num_dev, "test": num_test}
    for split in SPLITS:
        # each split gets its own stream so that changing one split's size leaves the others unchanged
        write_split(output_dir, split, counts[split], np.random.default_rng([seed, SPLITS.index(split) + 1]), module,
                    basis, num_regions, region_options)
    meta = {
        "generator": "modeling_mpsm.data.synthetic",
        "seed": seed,
        "num_images": counts,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "grammar": grammar,
        "twin_captions_per_image": module.FOCUS_CAPTIONS,
        "feature_dim": feature_dim,
        "num_regions": num_regions,
        **region_options,
        **module.META,
    }
    atomic_write_text(os.path.join(output_dir, "meta.json"), json.dumps(meta, indent=2))
    return meta


def twin_accuracy(scores, scenes: list[dict]) -> dict[str, float]:
    """
    How often a caption that mentions the change between twins scores its own image above the image's twin, per kind
    of change ("binding", "color", "count", "relation", ...), in percent: about 100 for a model that reads that kind
    of change, about 50 for one blind to it (ties count as losses). Records without `focus_captions` (scenes written
    before they were recorded) count all five captions.

    Args:
        scores: `[N, 5 N]` similarities of a split's images (rows) and captions (columns), in split order.
        scenes: the split's `{split}_scenes.json` records.
    """
    scores = np.asarray(scores)
    wins: dict[str, list[float]] = {}
    for image, scene in enumerate(scenes):
        if scene["twin"] < 0:
            continue
        focus = scene.get("focus_captions", range(CAPTIONS_PER_IMAGE))
        captions = [CAPTIONS_PER_IMAGE * image + k for k in focus]
        beats_twin = scores[image, captions] > scores[scene["twin"], captions]
        wins.setdefault(scene["change"]["kind"], []).extend(beats_twin.tolist())
    return {kind: 100.0 * float(np.mean(values)) for kind, values in sorted(wins.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=3000)
    parser.add_argument("--num_dev", type=int, default=200)
    parser.add_argument("--num_test", type=int, default=1000)
    parser.add_argument("--feature_dim", type=int, default=2048)
    parser.add_argument("--num_regions", type=int, default=36)
    parser.add_argument("--grammar", choices=sorted(GRAMMARS), default="people",
                        help="people (default): scenes with the statistics of real captions; objects: the older "
                             "grammar, a control")
    parser.add_argument("--position_code_weight", type=float,
                        help="objects grammar only (default 0.3): weight of the box's position code inside each region "
                             "feature; 0: position only in the boxes.")
    args = parser.parse_args(argv)
    generate(**vars(args))


if __name__ == "__main__":
    main()
