"""The default scene grammar: people and animals with their items, as real captions describe them.

Real captions (docs/caption_statistics.md, measured with the package's parser on the Flickr30K test and dev captions)
are about people and animals: what they wear and hold ("a man in a red shirt"), how many there are ("two dogs"), where
they are ("on the grass", "in the water"), and only rarely where one thing is relative to another ("to the left of").
Context decides a match mostly through *binding*: an image with a man in a red shirt and a woman in a blue shirt and
an image with a man in a blue shirt and a woman in a red shirt hold the same bag of objects and colours.

A scene is a picture of owner groups (a person or an animal, or a group of 2-3 of them), each owner with items
(garments, held objects) placed inside or overlapping its box, an optional scene object (bench, bicycle, boat, car)
and a place (grass, street, water ...). Scenes come in twin pairs that differ by one change:
- `binding`: two owners wear (or hold) items of the same kind and exchange their colours;
- `color`: one item, animal or object changes to a colour absent from the scene;
- `count`: a group of 2 becomes 3, or 3 becomes 2;
- `relation`: an owner and a free-standing object swap sides ("to the left of" / "to the right of").
The kinds are drawn at the rates the captions use those constructions. `FOCUS_CAPTIONS` of each image's five captions
are rendered from plans shared with its twin and mention the change; the others are drawn freely from the scene.

Region features pool what their box covers, like BUTD features: each scene is painted on a grid (place, objects,
owners, then the items on top), and a region's recipe is the coverage-weighted sum of the appearances under its box
(class prototype, and colour direction for coloured things). So a person's region carries their shirt's colour in
proportion to the shirt's share of the box; the shirt is also a region of its own. Region features carry no code of
absolute position: geometry is only in the boxes. Every region's colour evidence varies by `COLOR_JITTER` (lighting,
shading), which leaves an item's own region readable and makes its owner's diluted share ambiguous.
"""

import copy
from dataclasses import dataclass, field

import numpy as np

from ..common import CAPTIONS_PER_IMAGE
from .scenes_objects import jitter_box


# Statistics of the real captions this grammar is built from: docs/caption_statistics.json, key "f30k" (the 10,070
# Flickr30K test + dev captions), measured by benchmarks/caption_statistics.py with the package's parser. Fixed before
# any model was trained on these scenes.
BINDING_SHARE = 0.1853  # binding.captions_with_1_or_more_pct: a person or animal bound to a coloured item
MULTI_BINDING_SHARE = 0.0096  # binding.captions_with_2_or_more_pct: two or more owners, each to its coloured item
UNBOUND_COLOR_SHARE = 0.1603  # construction_mix.colour_unbound_pct: a colour not bound to an owner's item
COUNT_SHARE = 0.274  # counts.captions_with_count_word_pct
# directional.by_relation: relations with a direction (left/right, above/below/under, behind/in front of, on top
# of): 809 of 10,070 captions. Boxes show left/right unambiguously, so the scenes render them all as left/right.
DIRECTIONAL_SHARE = 0.0803
PROXIMITY_SHARE = 0.0459  # directional.by_relation: "near", "next to", "beside" (462 of 10,070)
SECOND_OWNER_SHARE = 0.1906  # persons.per_caption_pct: two (16.65) or three or more (2.41) person mentions
ANIMAL_SHARE = 0.09  # animals.mentions_total / (persons + animals): 1,092 of 12,066 owner mentions
PLACE_SHARE = 0.456  # attachments.captions_with_any_pct: a noun-preposition-noun attachment
HELD_SHARE = 0.0376  # binding.item_category_pct.held_object: held objects among the bound items

TWIN_KINDS = {  # twin kind -> the caption construction it tests, at that construction's rate
    "binding": BINDING_SHARE,
    "color": UNBOUND_COLOR_SHARE,
    "count": COUNT_SHARE,
    "relation": DIRECTIONAL_SHARE,
}
# Two of five captions mention the twin change: with three, binding captions would be 0.6 * 0.25 = 15 % of all
# captions from the binding twins alone, leaving free captions almost none.
FOCUS_CAPTIONS = 2
_FOCUSED = FOCUS_CAPTIONS / CAPTIONS_PER_IMAGE
_TWIN_SHARE = {kind: rate / sum(TWIN_KINDS.values()) for kind, rate in TWIN_KINDS.items()}
# Free captions bind, and name a direction, at the rates that bring all captions to the measured shares (the focused
# captions of binding and relation twins count first).
FREE_BINDING = max(0.0, (BINDING_SHARE - _FOCUSED * _TWIN_SHARE["binding"]) / (1 - _FOCUSED))
FREE_DIRECTIONAL = max(0.0, (DIRECTIONAL_SHARE - _FOCUSED * _TWIN_SHARE["relation"]) / (1 - _FOCUSED))
# Pictures hold more than their captions name: half the scenes (all binding scenes) hold a second owner group, a
# scene object stands in 40 %; captions name the second group at the rate that gives SECOND_OWNER_SHARE.
SECOND_GROUP = 0.5
SCENE_OBJECT = 0.4
MENTION_SECOND = SECOND_OWNER_SHARE / (_TWIN_SHARE["binding"] + (1 - _TWIN_SHARE["binding"]) * SECOND_GROUP)
ITEM_SHARES_PER_PERSON = (0.8432, 0.1479, 0.0089)  # items_per_person.distribution_pct: 1 / 2 / 3+ items per person
COUNT_SIZES = {2: 0.79, 3: 0.21}  # counts.expression_pct: "two" 50.1, "three" 13.6 (the other words: larger groups)

PERSONS = {"man": "men", "woman": "women", "boy": "boys", "girl": "girls"}
ANIMALS = {"dog": "dogs", "horse": "horses"}
OWNERS = {**PERSONS, **ANIMALS}
ANIMAL_COLORS = ("black", "white", "brown", "gray")
# All colours start with a consonant, so that changing one never turns "a" into "an".
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "purple", "gray", "brown")
# item -> (owners, preposition, box inside the owner's box as fractions (x1, y1, x2, y2); may overlap its edges)
ITEMS = {
    "shirt": (PERSONS, "in", (0.10, 0.20, 0.90, 0.50)),
    "jacket": (PERSONS, "in", (0.05, 0.20, 0.95, 0.55)),
    "dress": (("woman", "girl"), "in", (0.12, 0.22, 0.88, 0.85)),
    "hat": (PERSONS, "in", (0.28, 0.00, 0.72, 0.11)),
    "helmet": (PERSONS, "in", (0.26, 0.00, 0.74, 0.13)),
    "bag": (PERSONS, "with", (0.75, 0.40, 1.20, 0.62)),
    "umbrella": (PERSONS, "with", (-0.30, -0.25, 0.70, 0.08)),
    "ball": (("man", "boy", "girl", "dog"), "with", (0.80, 0.45, 1.15, 0.60)),
    "collar": (("dog",), "with", (0.05, 0.20, 0.30, 0.40)),
    "saddle": (("horse",), "with", (0.35, 0.05, 0.65, 0.35)),
}
TOPS = ("shirt", "jacket", "dress")  # every person wears one top
OBJECTS = ("bench", "bicycle", "car", "boat")
PLACES = {"grass": "on the grass", "street": "on the street", "beach": "on the beach", "water": "in the water",
          "snow": "in the snow", "field": "in a field", "sidewalk": "on the sidewalk"}
BACKDROPS = ("sky", "wall", "trees", "building")
CLASS_NAMES = tuple(OWNERS) + tuple(ITEMS) + OBJECTS
VERBS = {"man": ("is standing", "is walking", "is smiling"), "dog": ("is running", "is playing"),
         "horse": ("is standing", "is running")}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

# Region features
COLOR_WEIGHT = 0.7  # a coloured thing's colour direction, against 1.0 for its class prototype
COLOR_JITTER = 0.2  # std of every region's colour evidence (lighting, shading)
FEATURE_NOISE = 0.8  # std of the per-dimension noise before the ReLU, as the older grammar's object regions
GRID = (64, 48)  # painting grid (columns, rows)


@dataclass
class Thing:
    """An owner (person or animal), an item of an owner, or a scene object; `box` in pixels."""

    name: str
    color: str | None
    box: tuple[float, float, float, float]
    owner: int = -1  # items: index of the owner instance in `Scene.things`
    group: int = -1  # owners: index of their group in `Scene.groups`


@dataclass
class Scene:
    width: int
    height: int
    place: str
    backdrop: str
    things: list[Thing]
    groups: list[list[int]]  # owner instances by group, indices into `things`
    attached: int = -1  # the object an owner stands, sits or rides on (its index), -1 if none
    twin: int = -1
    change: dict = field(default_factory=dict)
    focus_captions: list[int] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)  # what each focused caption says about the change
    twin_kind: str = ""  # the change `make_twin` makes: a key of `TWIN_KINDS`

    def items_of(self, owner: int) -> list[int]:
        return [k for k, t in enumerate(self.things) if t.owner == owner]

    def objects(self) -> list[int]:
        return [k for k, t in enumerate(self.things) if t.name in OBJECTS]


def _owner_size(rng, name: str, width: int, height: int) -> tuple[float, float]:
    if name in PERSONS:
        return rng.uniform(0.13, 0.19) * width, rng.uniform(0.55, 0.8) * height * (0.8 if name in ("boy", "girl") else 1)
    if name == "dog":
        return rng.uniform(0.18, 0.26) * width, rng.uniform(0.2, 0.3) * height
    return rng.uniform(0.28, 0.36) * width, rng.uniform(0.42, 0.55) * height


def _dress(rng, scene: Scene, owner: int, top: str | None = None, avoid=()) -> None:
    """Give an owner instance its items: a top for a person (and maybe a hat or a held object), maybe an animal's."""
    name = scene.things[owner].name
    if name in PERSONS:
        tops = [t for t in TOPS if name in ITEMS[t][0]]
        names = [top or tops[rng.integers(len(tops))]]
        extra = int(rng.choice(len(ITEM_SHARES_PER_PERSON), p=ITEM_SHARES_PER_PERSON))
        others = [n for n in ITEMS if n not in TOPS and name in ITEMS[n][0]]
        names += [others[k] for k in rng.permutation(len(others))[:extra]]
    else:
        others = [n for n in ITEMS if name in ITEMS[n][0]]
        names = [top] if top else [others[k] for k in rng.permutation(len(others))[: int(rng.integers(0, 2))]]
    palette = [c for c in COLORS if c not in avoid]
    colors = rng.choice(len(palette), size=len(names), replace=False)
    for item, color in zip(names, colors):
        scene.things.append(Thing(item, palette[color], (0, 0, 0, 0), owner=owner))


def layout(rng, scene: Scene) -> None:
    """Place the owners and any free-standing object left to right in slots (neighbours may overlap a little), an
    attached object under its owner, and every item at its place inside or over its owner's box."""
    w, h = scene.width, scene.height
    units = [list(group) for group in scene.groups] + [[k] for k in scene.objects() if k != scene.attached]
    order = [k for u in rng.permutation(len(units)) for k in units[u]]  # group members stand side by side
    slot = w / len(order)
    for position, k in enumerate(order):
        thing = scene.things[k]
        if thing.name in OBJECTS:
            bw, bh = rng.uniform(0.7, 1.0) * slot, rng.uniform(0.2, 0.35) * h
        else:
            bw, bh = _owner_size(rng, thing.name, w, h)
            bw = min(bw, 1.1 * slot)
        cx = (position + 0.5 + rng.uniform(-0.15, 0.15)) * slot
        bottom = rng.uniform(0.88, 0.98) * h
        x1 = float(np.clip(cx - bw / 2, 0, w - bw))
        thing.box = (x1, bottom - bh, x1 + bw, bottom)
    if scene.attached >= 0:
        rider = next(k for group in scene.groups for k in group)
        x1, y1, x2, y2 = scene.things[rider].box
        bw = (x2 - x1) * rng.uniform(1.3, 1.8)
        cx = (x1 + x2) / 2
        ox1 = float(np.clip(cx - bw / 2, 0, w - bw))
        scene.things[scene.attached].box = (ox1, y1 + 0.55 * (y2 - y1), ox1 + bw, min(h - 1.0, y2 + 0.05 * (y2 - y1)))
    for thing in scene.things:
        if thing.owner >= 0:
            x1, y1, x2, y2 = scene.things[thing.owner].box
            fx1, fy1, fx2, fy2 = np.array(ITEMS[thing.name][2]) + rng.uniform(-0.03, 0.03, size=4)
            bw, bh = x2 - x1, y2 - y1
            box = (x1 + fx1 * bw, y1 + fy1 * bh, x1 + fx2 * bw, y1 + fy2 * bh)
            thing.box = (max(0.0, box[0]), max(0.0, box[1]), min(w - 1.0, box[2]), min(h - 1.0, box[3]))


def sample_scene(rng, kind: str) -> Scene:
    """A scene that can hold a twin change of `kind`."""
    width, height = int(rng.integers(480, 641)), int(rng.integers(360, 513))
    places = list(PLACES)
    scene = Scene(width, height, places[rng.integers(len(places))], BACKDROPS[rng.integers(len(BACKDROPS))], [], [],
                  twin_kind=kind)
    owners = list(OWNERS)
    person_or_animal = [(1 - ANIMAL_SHARE) / len(PERSONS)] * len(PERSONS) + [ANIMAL_SHARE / len(ANIMALS)] * len(ANIMALS)
    if kind == "binding":  # two single owners of different classes with items of one kind
        top = TOPS[rng.integers(2)] if rng.random() > HELD_SHARE else "ball"  # shirt/jacket, or a ball (also a dog's)
        fits = [o for o in owners if o in ITEMS[top][0]]
        names = [fits[k] for k in rng.choice(len(fits), size=2, replace=False)]
        counts = [1, 1]
    else:
        num_groups = 2 if rng.random() < SECOND_GROUP else 1
        names = [owners[k] for k in rng.choice(len(owners), size=num_groups, replace=False, p=person_or_animal)]
        counts = [1] * num_groups
        if kind == "count":
            counts[0] = int(rng.choice(list(COUNT_SIZES), p=list(COUNT_SIZES.values())))
        elif rng.random() < COUNT_SHARE:
            counts[-1] = int(rng.choice(list(COUNT_SIZES), p=list(COUNT_SIZES.values())))
    for group, (name, count) in enumerate(zip(names, counts)):
        members = []
        for _ in range(count):
            color = ANIMAL_COLORS[rng.integers(len(ANIMAL_COLORS))] if name in ANIMALS else None
            scene.things.append(Thing(name, color, (0, 0, 0, 0), group=group))
            members.append(len(scene.things) - 1)
        scene.groups.append(members)
    owner_indices = [k for group in scene.groups for k in group]
    if kind == "binding":
        _dress(rng, scene, owner_indices[0], top)
        first_color = scene.things[scene.items_of(owner_indices[0])[0]].color
        _dress(rng, scene, owner_indices[1], top, avoid=(first_color,))
    else:
        for owner in owner_indices:
            _dress(rng, scene, owner)
    if kind == "relation" or rng.random() < SCENE_OBJECT:  # a scene object, free-standing for a relation twin
        name = ("bench", "bicycle", "car")[rng.integers(3)] if kind == "relation" else OBJECTS[rng.integers(len(OBJECTS))]
        scene.things.append(Thing(name, COLORS[rng.integers(len(COLORS))], (0, 0, 0, 0)))
        if kind != "relation" and name != "car" and counts[0] == 1 and rng.random() < 0.5:
            scene.attached = len(scene.things) - 1
    layout(rng, scene)
    return scene


def _change_options(scene: Scene, kind: str) -> list:
    if kind == "binding":
        first, second = scene.groups[0][0], scene.groups[1][0]
        return [(scene.items_of(first)[0], scene.items_of(second)[0])]
    if kind == "color":
        return [k for k, t in enumerate(scene.things) if t.color is not None and t.name not in ANIMALS]
    if kind == "count":
        return [g for g, members in enumerate(scene.groups) if len(members) > 1]
    return [(scene.groups[0][0], k) for k in scene.objects() if k != scene.attached]


def make_twin(rng, scene: Scene) -> Scene:
    """Copy `scene` with one change of its `twin_kind`, recorded in `twin.change`. For a count twin from 3 to 2, `scene`'s
    things are first reordered so that the member to remove and its items come last (the plans shared by the twins
    index things, so the twin's indices must match)."""
    kind = scene.twin_kind
    options = _change_options(scene, kind)
    target = options[rng.integers(len(options))]
    if kind == "count" and len(scene.groups[target]) == 3:
        _move_to_end(scene, scene.groups[target][-1])
    twin = copy.deepcopy(scene)
    if kind == "binding":  # the two items exchange colours (the bag of objects and colours stays the same)
        a, b = twin.things[target[0]], twin.things[target[1]]
        a.color, b.color = b.color, a.color
    elif kind == "color":
        used = {t.color for t in scene.things}
        palette = [c for c in COLORS if c not in used]
        twin.things[target].color = palette[rng.integers(len(palette))]
    elif kind == "count":  # 2 <-> 3 members, then a fresh layout (another photo of the same scene)
        members = twin.groups[target]
        if len(members) == 3:
            removed = members.pop()
            twin.things = twin.things[:removed]
        else:
            twin.things.append(copy.deepcopy(twin.things[members[0]]))
            members.append(len(twin.things) - 1)
            _dress(rng, twin, members[-1])
        layout(rng, twin)
    else:  # an owner and a free-standing object swap their horizontal places
        a, b = twin.things[target[0]], twin.things[target[1]]
        shift_a = (b.box[0] + b.box[2]) / 2 - (a.box[0] + a.box[2]) / 2
        for k, thing in enumerate(twin.things):
            if k == target[0] or thing.owner == target[0]:
                thing.box = _shifted(thing.box, shift_a, twin.width)
        b.box = _shifted(b.box, -shift_a, twin.width)
    twin.change = {"kind": kind, "target": list(target) if isinstance(target, tuple) else target}
    return twin


def _shifted(box, dx, width):
    dx = float(np.clip(dx, -box[0], width - 1.0 - box[2]))
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def _move_to_end(scene: Scene, index: int) -> None:
    """Reorder `scene.things` so that thing `index` and then its items come last, renumbering the references."""
    moved = [index] + scene.items_of(index)
    order = [k for k in range(len(scene.things)) if k not in moved] + moved
    new = {old: new for new, old in enumerate(order)}
    scene.things = [scene.things[k] for k in order]
    for thing in scene.things:
        thing.owner = new[thing.owner] if thing.owner >= 0 else -1
    scene.groups = [[new[k] for k in group] for group in scene.groups]
    scene.attached = new.get(scene.attached, -1)


# Captions ----------------------------------------------------------------------------------------------------------


def relation_word(scene: Scene, subject: int, other: int) -> str:
    """'to the left of' or 'to the right of': where `subject` stands relative to `other`."""
    a, b = scene.things[subject].box, scene.things[other].box
    return "to the left of" if a[0] + a[2] < b[0] + b[2] else "to the right of"


def sample_plan(rng, scene: Scene, change: dict | None = None) -> dict:
    """Which owners a caption names, which of their items it binds, what it says about the place, the object or the
    relation. With `change`, the plan mentions the changed binding, colour, count or relation."""
    groups = list(range(len(scene.groups)))
    plan = {"subject": int(rng.integers(len(groups))), "bind": [], "second": None, "context": None,
            "verb": int(rng.integers(3))}
    kind = change["kind"] if change else None
    if kind == "binding":
        owners = [scene.things[k].owner for k in change["target"]]
        first = int(rng.integers(2))
        plan["subject"] = scene.things[owners[first]].group
        plan["bind"] = [change["target"][first]]
        if rng.random() < MULTI_BINDING_SHARE / BINDING_SHARE:
            plan["second"] = scene.things[owners[1 - first]].group
            plan["bind"].append(change["target"][1 - first])
    elif kind == "color":
        target = change["target"]
        thing = scene.things[target]
        if thing.owner >= 0:
            plan["subject"], plan["bind"] = scene.things[thing.owner].group, [target]
        else:
            plan["context"] = ("object", target)
    elif kind == "count":
        plan["subject"] = change["target"]
    elif kind == "relation":
        plan["subject"] = scene.things[change["target"][0]].group
        plan["context"] = ("relation", change["target"][1])
    if kind is None:  # a free caption
        members = scene.groups[plan["subject"]]
        if len(members) == 1 and scene.items_of(members[0]) and rng.random() < FREE_BINDING:
            items = scene.items_of(members[0])
            plan["bind"] = [items[rng.integers(len(items))]]
        if len(groups) > 1 and rng.random() < MENTION_SECOND:
            plan["second"] = (plan["subject"] + 1) % len(groups)
    if plan["context"] is None:
        free = [k for k in scene.objects() if k != scene.attached]
        roll = rng.random()
        if scene.attached >= 0 and plan["subject"] == 0 and roll < 0.5:  # the rider's group: "on a bench"
            plan["context"] = ("object", scene.attached)
        elif free and roll < FREE_DIRECTIONAL:
            plan["context"] = ("relation", free[0])
        elif free and roll < FREE_DIRECTIONAL + PROXIMITY_SHARE:
            plan["context"] = ("near", free[0])
        elif rng.random() < PLACE_SHARE:
            plan["context"] = ("place",)
    plan["color_object"] = bool(rng.random() < 0.5) or kind == "color"  # half the objects named get their colour
    return plan


def _noun_phrase(scene: Scene, group: int, binds: list[int]) -> str:
    members = scene.groups[group]
    owner = scene.things[members[0]]
    if len(members) > 1:
        return f"{COUNT_WORDS[len(members)]} {OWNERS[owner.name]}"
    words = ["a"] + ([owner.color] if owner.color else []) + [owner.name]
    for item in binds:
        if scene.things[item].owner == members[0]:
            thing = scene.things[item]
            words += [ITEMS[thing.name][1], "a", thing.color, thing.name]
    return " ".join(words)


def render(scene: Scene, plan: dict) -> str:
    """'A man in a red shirt and a woman in a blue shirt are standing on the grass.'"""
    subject = _noun_phrase(scene, plan["subject"], plan["bind"])
    plural = len(scene.groups[plan["subject"]]) > 1 or plan["second"] is not None
    if plan["second"] is not None:
        subject += " and " + _noun_phrase(scene, plan["second"], plan["bind"])
    name = scene.things[scene.groups[plan["subject"]][0]].name
    verbs = VERBS["man" if name in PERSONS else name]
    verb = verbs[plan["verb"] % len(verbs)]
    if plural:
        verb = verb.replace("is ", "are ")
    context = plan["context"]
    tail = ""
    if context is not None:
        if context[0] == "place":
            tail = " " + PLACES[scene.place]
        else:
            thing = scene.things[context[1]]
            name = (f"{thing.color} " if plan["color_object"] else "") + thing.name
            if context[0] == "object":
                preposition = "in" if thing.name == "boat" else "near" if thing.name == "car" else "on"
                tail = f" {preposition} a {name}"
            elif context[0] == "near":
                tail = f" near a {name}"
            else:
                tail = f" {relation_word(scene, scene.groups[plan['subject']][0], context[1])} a {name}"
    text = f"{subject} {verb}{tail}"
    return text[0].upper() + text[1:] + "."


def claim(scene: Scene, plan: dict) -> dict:
    """What a focused caption says about its scene's twin change, for the oracle readers."""
    kind = scene.change["kind"]
    if kind == "binding":
        item = scene.things[plan["bind"][0]]
        return {"kind": kind, "owner": scene.things[item.owner].name, "item": item.name, "color": item.color}
    if kind == "color":
        thing = scene.things[scene.change["target"]]
        return {"kind": kind, "thing": thing.name, "color": thing.color}
    if kind == "count":
        members = scene.groups[scene.change["target"]]
        return {"kind": kind, "thing": scene.things[members[0]].name, "count": len(members)}
    subject, other = scene.change["target"]
    return {"kind": kind, "subject": scene.things[subject].name, "object": scene.things[other].name,
            "relation": relation_word(scene, subject, other)}


def sample_base(rng) -> Scene:
    """A scene to make a twin of: a twin kind drawn at the rates of `TWIN_KINDS`, then a scene that can hold it."""
    kinds, rates = list(TWIN_KINDS), np.array(list(TWIN_KINDS.values()))
    kind = kinds[rng.choice(len(kinds), p=rates / rates.sum())]
    scene = sample_scene(rng, kind)
    while not _change_options(scene, kind):  # e.g. a colour twin of a lone dog without items
        scene = sample_scene(rng, kind)
    return scene


# Region features ---------------------------------------------------------------------------------------------------


class FeatureBasis:
    """Rows of the feature basis `[K, D]`: class prototypes, place and backdrop prototypes, colour directions and a
    'part' direction. No position rows: pooled detector features carry little absolute position."""

    vocabularies = {"class": CLASS_NAMES, "place": tuple(PLACES), "backdrop": BACKDROPS, "color": COLORS}

    def __init__(self, rng, feature_dim: int):
        self.offsets, start = {}, 0
        for name, words in self.vocabularies.items():
            self.offsets[name] = start
            start += len(words)
        self.offsets["part"] = start
        self.matrix = rng.standard_normal((start + 1, feature_dim), dtype=np.float32)

    def index(self, kind: str, value: str | None = None) -> int:
        return self.offsets[kind] + (self.vocabularies[kind].index(value) if value is not None else 0)


def paint(scene: Scene) -> np.ndarray:
    """The scene on a `GRID` of cells, int16 [rows, columns]: -2 backdrop, -1 place, else the index of the thing seen
    there (objects, then owners, then items on top)."""
    columns, rows = GRID
    canvas = np.full((rows, columns), -2, dtype=np.int16)
    canvas[rows // 2 :] = -1
    xs = (np.arange(columns) + 0.5) * scene.width / columns
    ys = (np.arange(rows) + 0.5) * scene.height / rows
    layers = sorted(range(len(scene.things)), key=lambda k: (scene.things[k].owner >= 0, scene.things[k].name not in OBJECTS))
    for k in layers:
        x1, y1, x2, y2 = scene.things[k].box
        canvas[np.ix_((ys >= y1) & (ys < y2), (xs >= x1) & (xs < x2))] = k
    return canvas


def pooled_recipes(scene: Scene, boxes: np.ndarray, basis: FeatureBasis) -> tuple[np.ndarray, np.ndarray]:
    """What each box covers on the painted scene, and the coverage-weighted sum of those appearances.

    Returns:
        recipe: float32 [R, K] coefficients over the basis rows (a thing's class prototype 1, its colour `COLOR_WEIGHT`,
            each times the share of the box the thing covers)
        coverage: float32 [R, T + 2] share of each box covered by each thing, the place and the backdrop
    """
    appearance = np.zeros((len(scene.things) + 2, basis.matrix.shape[0]), dtype=np.float32)  # things, place, backdrop
    for k, thing in enumerate(scene.things):
        appearance[k, basis.index("class", thing.name)] = 1.0
        if thing.color is not None:
            appearance[k, basis.index("color", thing.color)] = COLOR_WEIGHT
    appearance[-2, basis.index("place", scene.place)] = 1.0
    appearance[-1, basis.index("backdrop", scene.backdrop)] = 1.0
    canvas = paint(scene)
    columns, rows = GRID
    xs = (np.arange(columns) + 0.5) * scene.width / columns
    ys = (np.arange(rows) + 0.5) * scene.height / rows
    coverage = np.zeros((len(boxes), len(scene.things) + 2), dtype=np.float32)
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        inside_rows = (ys >= y1) & (ys < y2)
        inside_columns = (xs >= x1) & (xs < x2)
        inside_rows[np.abs(ys - (y1 + y2) / 2).argmin()] = True  # at least the centre cell
        inside_columns[np.abs(xs - (x1 + x2) / 2).argmin()] = True
        cells = canvas[np.ix_(inside_rows, inside_columns)].ravel()
        coverage[r] = np.bincount(cells % (len(scene.things) + 2), minlength=len(scene.things) + 2) / cells.size
    return coverage @ appearance, coverage


def scene_regions(rng, scene: Scene, basis: FeatureBasis, num_regions: int):
    """Region recipes of one image: detector-like boxes (each thing's own box, jittered duplicates, owners' upper and
    lower halves, background boxes), each pooling what it covers on the painted scene.

    Returns:
        recipe: float32 [num_regions, K] coefficients over the basis rows
        noise: float32 [num_regions] noise standard deviation per region
        boxes: float32 [num_regions, 4] pixel boxes
        labels: int16 [num_regions] class index of the thing covering most of the box, -1 for place or backdrop
    """
    w, h = scene.width, scene.height
    boxes = []
    for thing in scene.things:
        boxes.append(jitter_box(rng, thing.box, 0.04, w, h))
        for _ in range(int(rng.integers(1, 3)) if thing.owner < 0 else int(rng.integers(0, 2))):
            boxes.append(jitter_box(rng, thing.box, 0.12, w, h))
        if thing.name in OWNERS and rng.random() < 0.5:
            x1, y1, x2, y2 = thing.box
            half = (y1, (y1 + y2) / 2) if rng.random() < 0.5 else ((y1 + y2) / 2, y2)
            boxes.append((x1, half[0], x2, half[1]))
    boxes = [boxes[k] for k in rng.permutation(len(boxes))][:num_regions]
    while len(boxes) < num_regions:
        bw, bh = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.6) * h
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append((x1, y1, x1 + bw, y1 + bh))
    boxes = np.array([boxes[k] for k in rng.permutation(num_regions)], dtype=np.float32)  # order carries no meaning

    recipe, coverage = pooled_recipes(scene, boxes, basis)
    colors = slice(basis.offsets["color"], basis.offsets["color"] + len(COLORS))
    recipe[:, colors] += rng.normal(0.0, COLOR_JITTER, size=(num_regions, len(COLORS))).astype(np.float32)
    things = coverage[:, : len(scene.things)]
    labels = np.where(things.max(1) >= 0.5, [CLASS_NAMES.index(scene.things[k].name) for k in things.argmax(1)], -1)
    noise = np.full(num_regions, FEATURE_NOISE, dtype=np.float32)
    return recipe, noise, boxes, labels.astype(np.int16)


def scene_record(scene: Scene) -> dict:
    """The `{split}_scenes.json` record of a scene (without its image id)."""
    return {"width": scene.width, "height": scene.height, "place": scene.place, "backdrop": scene.backdrop,
            "twin": scene.twin, "change": scene.change, "focus_captions": scene.focus_captions, "claims": scene.claims,
            "things": [vars(t) | {"box": [round(v, 2) for v in t.box]} for t in scene.things], "groups": scene.groups,
            "attached": scene.attached}


META = {
    "classes": list(CLASS_NAMES),
    "colors": list(COLORS),
    "places": list(PLACES),
    "backdrops": list(BACKDROPS),
    "twin_kinds": TWIN_KINDS,
    "focus_captions": FOCUS_CAPTIONS,
    "color_jitter": COLOR_JITTER,
}
