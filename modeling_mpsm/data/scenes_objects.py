"""The older scene grammar, kept as a control: objects with attributes and counts, and directional relations.

Every image is a *scene*: 2-5 entities (an object class with a colour, a size, maybe a material, and a
count of 1-3 identical members) placed in a `w x h` picture. Scenes are generated in *twin pairs*: the
second scene of a pair is a copy of the first with exactly one change (one attribute, the count of a group,
or the positions of two entities swapped, which flips their spatial relation). Three of the five captions
of each twin are rendered from one shared caption plan that mentions the changed part, so they differ
from their twin's captions by exactly one word ("a red car" / "a blue car", "left of" / "right of",
"two dogs" / "three dogs"). Classes co-occur at random, directional relations are 45 % of the twins, no caption
binds an item to an owner, and every region feature carries a Fourier code of its box's absolute position: the
opposite of real captions (docs/caption_statistics.md), which is why `scenes_people` is the default.

Region features imitate BUTD bottom-up attention: 36 regions per image, made of whole-object regions
(with jittered duplicates), part regions (sub-boxes that carry the class more weakly) and background or
clutter regions. A region's feature is `relu(recipe @ basis + noise)`, where the basis rows are class and
background prototypes, attribute directions and a Fourier position encoding of the box.
"""

import copy
from dataclasses import dataclass, field

import numpy as np

from ..common import CAPTIONS_PER_IMAGE


FOCUS_CAPTIONS = 3  # captions per image rendered from the plan shared with the twin

# Colour and material words all start with a consonant so that changing one never turns "a" into "an".
ANIMAL_COLORS = ("black", "white", "brown", "gray")
ALL_COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray", "pink", "purple")
SIZES = ("small", "large")
MATERIALS = ("wooden", "metal", "plastic", "glass", "stone", "leather", "paper")

# name: (plural, colour palette, materials)
CLASSES = {
    "dog": ("dogs", ANIMAL_COLORS, ()),
    "cat": ("cats", ANIMAL_COLORS, ()),
    "horse": ("horses", ANIMAL_COLORS, ()),
    "cow": ("cows", ANIMAL_COLORS, ()),
    "sheep": ("sheep", ANIMAL_COLORS, ()),
    "bird": ("birds", ALL_COLORS, ()),
    "duck": ("ducks", ("white", "brown", "yellow", "black"), ()),
    "car": ("cars", ALL_COLORS, ()),
    "bus": ("buses", ALL_COLORS, ()),
    "truck": ("trucks", ALL_COLORS, ()),
    "bicycle": ("bicycles", ALL_COLORS, ()),
    "boat": ("boats", ALL_COLORS, ("wooden", "metal")),
    "bench": ("benches", ALL_COLORS, ("wooden", "metal", "stone")),
    "chair": ("chairs", ALL_COLORS, ("wooden", "metal", "plastic")),
    "table": ("tables", ALL_COLORS, ("wooden", "metal", "glass")),
    "umbrella": ("umbrellas", ALL_COLORS, ()),
    "kite": ("kites", ALL_COLORS, ("paper", "plastic")),
    "ball": ("balls", ALL_COLORS, ("leather", "plastic")),
    "bottle": ("bottles", ALL_COLORS, ("glass", "plastic")),
    "cup": ("cups", ALL_COLORS, ("glass", "paper", "plastic")),
    "vase": ("vases", ALL_COLORS, ("glass", "stone")),
    "suitcase": ("suitcases", ALL_COLORS, ("leather", "plastic")),
    "lamp": ("lamps", ALL_COLORS, ("metal", "glass")),
    "box": ("boxes", ALL_COLORS, ("wooden", "metal", "paper")),
    "clock": ("clocks", ALL_COLORS, ("wooden", "metal")),
}
CLASS_NAMES = tuple(CLASSES)
BACKGROUNDS = ("sky", "grass", "road", "wall", "water", "floor", "sand", "snow")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "next to"}

# Caption templates. {A}, {B}, {C}: noun phrases; {rel}/{rel2}: relation of A (resp. C) to B; {is}: is/are
# agreeing with A; {all}: every entity of the scene.
SINGLE_TEMPLATES = (
    "{A} in the picture",
    "there {is} {A} in this image",
    "a photo of {A}",
    "{A} can be seen here",
    "an image showing {A}",
    "a close view of {A} on a plain background",
)
PAIR_TEMPLATES = (
    "{A} and {B}",
    "{A} together with {B}",
    "{A} and {B} in the same scene",
)
RELATION_TEMPLATES = (
    "{A} {rel} {B}",
    "{A} {is} {rel} {B}",
    "there {is} {A} {rel} {B}",
    "a picture of {A} {rel} {B}",
    "we see {A} {rel} {B}",
    "{A} placed {rel} {B}",
    "{A} {rel} {B} and {C}",
)
SCENE_TEMPLATES = (
    "{A}, {B} and {C}",
    "a scene with {A}, {B} and {C}",
    "{A} {is} {rel} {B} while {C} {isC} {rel2} {B}",
    "a scene containing {all}",
    "{all} on a plain background",
)
TEMPLATES = SINGLE_TEMPLATES + PAIR_TEMPLATES + RELATION_TEMPLATES + SCENE_TEMPLATES


@dataclass
class Entity:
    """A group of `count` identical objects; `box` is the union box of its members, in pixels."""

    name: str
    color: str
    size: str
    material: str | None
    count: int
    box: tuple[float, float, float, float]

    def member_boxes(self) -> list[tuple[float, float, float, float]]:
        """Split the union box horizontally into `count` member boxes."""
        x1, y1, x2, y2 = self.box
        step = (x2 - x1) / self.count
        return [(x1 + k * step, y1, x1 + (k + 1) * step, y2) for k in range(self.count)]

    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    """One image: its size, two background kinds, its entities, the index of its twin and the twin change."""

    width: int
    height: int
    background: tuple[str, str]
    entities: list[Entity]
    twin: int = -1
    change: dict = field(default_factory=dict)
    focus_captions: list[int] = field(default_factory=list)  # which of the five captions mention the twin change


def relation(a: Entity, b: Entity, width: int, height: int) -> str:
    """Spatial relation of `a` to `b` from their box centres: 'left of', 'right of', 'above', 'below' or 'next to'."""
    (ax, ay), (bx, by) = a.center(), b.center()
    dx, dy = (ax - bx) / width, (ay - by) / height
    if abs(dx) >= abs(dy):
        if abs(dx) < 0.2:
            return "next to"
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _entity_box(rng, size: str, count: int, center, width: int, height: int):
    """Union box of a group of `count` members of the given size, centred exactly at `center` (shrunk to fit inside
    the image, never shifted, so that relations, which depend on centres only, stay as sampled)."""
    cx, cy = center
    scale = rng.uniform(0.12, 0.18) if size == "small" else rng.uniform(0.24, 0.34)
    bw = min(scale * width * count**0.8, 2 * min(cx, width - cx))
    bh = min(scale * height * rng.uniform(0.8, 1.2), 2 * min(cy, height - cy))
    return (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)


def _resize(rng, entity: Entity, width: int, height: int) -> None:
    """Recompute the box of an entity after a size or count change, keeping its centre."""
    entity.box = _entity_box(rng, entity.size, entity.count, entity.center(), width, height)


def sample_scene(rng) -> Scene:
    """Draw a scene of 2-5 entities of distinct classes with well-separated centres."""
    width, height = int(rng.integers(480, 641)), int(rng.integers(360, 513))
    num_entities = int(rng.integers(2, 6))
    names = rng.choice(len(CLASS_NAMES), size=num_entities, replace=False)
    centers: list[tuple[float, float]] = []
    while len(centers) < num_entities:  # rejection sampling keeps relations unambiguous
        c = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
        if all(abs(c[0] - o[0]) / width + abs(c[1] - o[1]) / height > 0.25 for o in centers):
            centers.append(c)
    entities = []
    for index, center in zip(names, centers):
        name = CLASS_NAMES[index]
        _, colors, materials = CLASSES[name]
        size = SIZES[rng.integers(len(SIZES))]
        count = int(rng.choice([1, 1, 1, 2, 3]))
        material = materials[rng.integers(len(materials))] if materials else None
        color = colors[rng.integers(len(colors))]
        entities.append(Entity(name, color, size, material, count, _entity_box(rng, size, count, center, width, height)))
    background = tuple(BACKGROUNDS[i] for i in rng.choice(len(BACKGROUNDS), size=2, replace=False))
    return Scene(width, height, background, entities)


sample_base = sample_scene  # the grammar's scene to make a twin of (`synthetic.generate_scenes`)


def make_twin(rng, scene: Scene) -> Scene:
    """Copy `scene` with exactly one change, recorded in `twin.change`.

    Changes: an attribute (colour, size, material), the count of a group (2 <-> 3), or swapping the centres of
    two entities whose relation is directional (left/right/above/below), which flips that relation.
    """
    twin = copy.deepcopy(scene)
    options = []  # (kind, entity index or pair of indices)
    for i, e in enumerate(scene.entities):
        options += [("color", i), ("size", i)]
        if len(CLASSES[e.name][2]) > 1:
            options.append(("material", i))
        if e.count > 1:
            options.append(("count", i))
    for i, a in enumerate(scene.entities):
        for j, b in enumerate(scene.entities):
            if i < j and relation(a, b, scene.width, scene.height) != "next to":
                options += [("relation", (i, j))] * 2
    kind, target = options[rng.integers(len(options))]
    entity = None if kind == "relation" else twin.entities[target]
    if kind == "relation":
        a, b = twin.entities[target[0]], twin.entities[target[1]]
        ca, cb = a.center(), b.center()
        a.box = _entity_box(rng, a.size, a.count, cb, scene.width, scene.height)
        b.box = _entity_box(rng, b.size, b.count, ca, scene.width, scene.height)
    elif kind == "color":
        colors = [c for c in CLASSES[entity.name][1] if c != entity.color]
        entity.color = colors[rng.integers(len(colors))]
    elif kind == "material":
        materials = [m for m in CLASSES[entity.name][2] if m != entity.material]
        entity.material = materials[rng.integers(len(materials))]
    elif kind == "size":
        entity.size = "large" if entity.size == "small" else "small"
        _resize(rng, entity, scene.width, scene.height)
    elif kind == "count":
        entity.count = 5 - entity.count
        _resize(rng, entity, scene.width, scene.height)
    twin.change = {"kind": kind, "target": list(target) if kind == "relation" else target}
    return twin


def noun_phrase(entity: Entity, show: tuple[str, ...]) -> str:
    """'a small red car', 'two wooden benches', ... with the attributes listed in `show`."""
    words = [COUNT_WORDS[entity.count]]
    if "size" in show:
        words.append(entity.size)
    if "color" in show:
        words.append(entity.color)
    if "material" in show and entity.material:
        words.append(entity.material)
    noun = CLASSES[entity.name][0] if entity.count > 1 else entity.name
    if words == ["a"] and noun[0] in "aeiou":
        words = ["an"]
    return " ".join(words + [noun])


def sample_plan(rng, scene: Scene, focus: dict | None = None) -> dict:
    """Choose a template, the entities filling its slots and the attributes each noun phrase shows.

    With `focus` (a twin change), the plan mentions the changed attribute, count or relation, so that it renders
    to captions differing by one word between the two twins.
    """
    n = len(scene.entities)
    if focus is None:
        candidates = [t for t, template in enumerate(TEMPLATES) if sum(f"{{{s}}}" in template for s in "ABC") <= n]
        template = int(candidates[rng.integers(len(candidates))])
        slots = [int(i) for i in rng.permutation(n)]
    elif focus["kind"] == "relation":
        i, j = focus["target"]
        options = [TEMPLATES.index(t) for t in RELATION_TEMPLATES if "{C}" not in t or n > 2]
        template = options[rng.integers(len(options))]
        first, second = (i, j) if rng.random() < 0.5 else (j, i)
        slots = [first, second] + [int(k) for k in rng.permutation(n) if k not in (i, j)]
    else:
        target = focus["target"]
        pool = SINGLE_TEMPLATES + PAIR_TEMPLATES + RELATION_TEMPLATES[:-1]
        template = TEMPLATES.index(pool[rng.integers(len(pool))])
        others = [int(k) for k in rng.permutation(n) if k != target]
        slots = [target] + others if rng.random() < 0.6 else others[:1] + [target] + others[1:]
    shows = []
    for k in range(n):
        show = tuple(a for a in ("size", "color", "material") if rng.random() < 0.5)
        if focus is not None and focus["kind"] in ("color", "size", "material") and k == focus["target"]:
            show = tuple(sorted(set(show) | {focus["kind"]}))
        shows.append(show)
    return {"template": template, "slots": slots, "shows": shows}


def render(scene: Scene, plan: dict) -> str:
    """Fill the plan's template from the scene: 'A red car left of two wooden benches.'"""
    ents, shows, w, h = scene.entities, plan["shows"], scene.width, scene.height
    slots = plan["slots"] + [plan["slots"][0]] * 3  # pad so every template can index A, B, C
    a, b, c = (ents[k] for k in slots[:3])
    phrase = {k: noun_phrase(ents[k], shows[k]) for k in range(len(ents))}
    everything = [phrase[k] for k in plan["slots"]]
    text = TEMPLATES[plan["template"]].format(
        A=phrase[slots[0]],
        B=phrase[slots[1]],
        C=phrase[slots[2]],
        rel=relation(a, b, w, h),
        rel2=relation(c, b, w, h),
        all=", ".join(everything[:-1]) + " and " + everything[-1],
        **{"is": "is" if a.count == 1 else "are", "isC": "is" if c.count == 1 else "are"},
    )
    return text[0].upper() + text[1:] + "."


class FeatureBasis:
    """Rows of the feature basis `[K, D]`: class prototypes, background prototypes, colour, size and material
    directions, a 'part' direction and a projection of a 12-d Fourier position code."""

    def __init__(self, rng, feature_dim: int):
        self.offsets = {}
        sizes = {
            "class": len(CLASS_NAMES),
            "background": len(BACKGROUNDS),
            "color": len(ALL_COLORS),
            "size": len(SIZES),
            "material": len(MATERIALS),
            "part": 1,
            "position": 12,
        }
        start = 0
        for name, size in sizes.items():
            self.offsets[name] = start
            start += size
        self.matrix = rng.standard_normal((start, feature_dim), dtype=np.float32)

    vocabularies = {"class": CLASS_NAMES, "background": BACKGROUNDS, "color": ALL_COLORS, "size": SIZES, "material": MATERIALS}

    def index(self, kind: str, value: str | None = None) -> int:
        """Row of the basis holding `value` of `kind` ('class', 'color', ...), or the single row of 'part'."""
        return self.offsets[kind] + (self.vocabularies[kind].index(value) if value is not None else 0)

    def position_code(self, box, width: int, height: int) -> np.ndarray:
        """Fourier features of the normalised box centre and extent, shape [12]."""
        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        bw, bh = (x2 - x1) / width, (y2 - y1) / height
        angles = np.pi * np.array([cx, cy, 2 * cx, 2 * cy, bw, bh])
        return np.concatenate([np.sin(angles), np.cos(angles)])


def jitter_box(rng, box, amount: float, width: int, height: int):
    """A detector's imprecise box: each side moved by up to `amount` of the box's size, kept inside the image."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    d = rng.uniform(-amount, amount, size=4) * np.array([bw, bh, bw, bh])
    nx1, ny1 = max(0.0, x1 + d[0]), max(0.0, y1 + d[1])
    nx2, ny2 = min(width - 1.0, x2 + d[2]), min(height - 1.0, y2 + d[3])
    return (nx1, ny1, max(nx2, nx1 + 2.0), max(ny2, ny1 + 2.0))


def scene_regions(rng, scene: Scene, basis: FeatureBasis, num_regions: int, position_code_weight: float = 0.3):
    """Region recipes of one image (`position_code_weight` scales the box's position code inside the feature).

    Returns:
        recipe: float32 [num_regions, K] coefficients over the basis rows
        noise: float32 [num_regions] noise standard deviation per region
        boxes: float32 [num_regions, 4] pixel boxes
        labels: int16 [num_regions] class index, -1 for background
    """
    w, h = scene.width, scene.height
    rows = []  # (coefficients dict, noise, box, label)
    budget = num_regions - max(6, num_regions // 4)  # leave room for background and clutter
    members = [(e, box) for e in scene.entities for box in e.member_boxes()]
    extras = []
    for entity, box in members:
        label = CLASS_NAMES.index(entity.name)
        attributes = {basis.index("color", entity.color): 0.7, basis.index("size", entity.size): 0.5}
        if entity.material:
            attributes[basis.index("material", entity.material)] = 0.5
        whole = {basis.index("class", entity.name): 1.0, **attributes}
        rows.append((whole, 0.8, jitter_box(rng, box, 0.03, w, h), label))
        for _ in range(int(rng.integers(1, 3))):
            extras.append((whole, 0.9, jitter_box(rng, box, 0.12, w, h), label))
        for _ in range(int(rng.integers(1, 3))):
            x1, y1, x2, y2 = box
            fx, fy = rng.uniform(0.3, 0.6, size=2)
            px, py = x1 + rng.uniform(0, 1 - fx) * (x2 - x1), y1 + rng.uniform(0, 1 - fy) * (y2 - y1)
            part_box = (px, py, px + fx * (x2 - x1), py + fy * (y2 - y1))
            part = {k: 0.5 * v for k, v in whole.items()} | {basis.index("part"): 0.6}
            extras.append((part, 1.1, part_box, label))
    rows = rows[:budget]
    rows += [extras[k] for k in rng.permutation(len(extras))][: max(0, budget - len(rows))]
    while len(rows) < num_regions:
        backdrop = scene.background[len(rows) % 2]
        bw, bh = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.6) * h
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        rows.append(({basis.index("background", backdrop): 0.8}, 1.0, (x1, y1, x1 + bw, y1 + bh), -1))
    rows = [rows[k] for k in rng.permutation(num_regions)]  # BUTD region order carries no meaning
    recipe = np.zeros((num_regions, basis.matrix.shape[0]), dtype=np.float32)
    position = basis.offsets["position"]
    for r, (coefficients, _, box, _) in enumerate(rows):
        for index, value in coefficients.items():
            recipe[r, index] = value
        recipe[r, position : position + 12] = position_code_weight * basis.position_code(box, w, h)
    noise = np.array([row[1] for row in rows], dtype=np.float32)
    boxes = np.array([row[2] for row in rows], dtype=np.float32)
    labels = np.array([row[3] for row in rows], dtype=np.int16)
    return recipe, noise, boxes, labels


def scene_record(scene: Scene) -> dict:
    """The `{split}_scenes.json` record of a scene (without its image id)."""
    return {"width": scene.width, "height": scene.height, "background": list(scene.background), "twin": scene.twin,
            "change": scene.change, "focus_captions": scene.focus_captions,
            "entities": [vars(e) | {"box": [round(v, 2) for v in e.box]} for e in scene.entities]}


META = {
    "classes": list(CLASS_NAMES),
    "colors": list(ALL_COLORS),
    "sizes": list(SIZES),
    "materials": list(MATERIALS),
    "backgrounds": list(BACKGROUNDS),
    "relations": list(RELATIONS),
    "templates": list(TEMPLATES),
}
