import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary, load_scan_vocabulary, tokenize_caption


# The real Flickr30K SCAN vocabulary: in $MPSM_SHARED_DIR/data when set, else in ../shared/data beside the repository
# (as in CI). No machine-specific path: the tests that need it skip when neither holds the file.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_NAME = "f30k_precomp_vocab.json"
SHARED_DATA_DIRS = [os.path.join(os.environ["MPSM_SHARED_DIR"], "data")] if os.environ.get("MPSM_SHARED_DIR") else []
SHARED_DATA_DIRS.append(os.path.join(REPO, "..", "shared", "data"))
F30K_VOCAB = next((os.path.join(d, VOCAB_NAME) for d in SHARED_DATA_DIRS if os.path.isfile(os.path.join(d, VOCAB_NAME))),
                  None)


@pytest.fixture(scope="module")
def f30k_word2idx():
    if F30K_VOCAB is None:
        pytest.skip(f"{VOCAB_NAME} is in none of {SHARED_DATA_DIRS} (set MPSM_SHARED_DIR to the shared folder)")
    return load_scan_vocabulary(F30K_VOCAB)


@pytest.fixture(scope="module")
def f30k_tokenizer(f30k_word2idx):
    return build_tokenizer(f30k_word2idx)


@pytest.mark.parametrize(
    "text, words",
    [
        ("A man in a white-walled room.", ["a", "man", "in", "a", "white-walled", "room"]),
        ("Button-down shirt, jeans; hat!", ["button-down", "shirt", "jeans", "hat"]),
        ("The man's dog isn't here", ["the", "man", "'s", "dog", "is", "n't", "here"]),
        ("rock 'n roll 'quoted' 2 dogs", ["rock", "'n", "roll", "quoted", "2", "dogs"]),
        ("Café  NAÏVE -- shirt- -x", ["cafe", "naive", "shirt", "x"]),
        ("... !!", []),
    ],
)
def test_tokenize_caption(text, words):
    assert tokenize_caption(text) == words


def test_scan_vocabulary_matches_file(f30k_word2idx):
    with open(F30K_VOCAB) as file:
        data = json.load(file)
    assert len(f30k_word2idx) == 8481
    assert f30k_word2idx == data["word2idx"]
    assert all(data["idx2word"][str(index)] == word for word, index in f30k_word2idx.items())
    assert [f30k_word2idx[t] for t in ["<pad>", "<start>", "<end>", "<unk>"]] == [0, 1, 2, 3]
    assert f30k_word2idx["white-walled"] == 6 and f30k_word2idx["button-down"] == 21


def test_tokenizer_ids_match_file(f30k_word2idx, f30k_tokenizer):
    encoding = f30k_tokenizer("A yellow white-walled button-down zzzqqq.")
    expected = [1, f30k_word2idx["a"], 7, 6, 21, 3, 2]
    assert encoding["input_ids"] == expected
    assert encoding["attention_mask"] == [1] * 7
    assert f30k_tokenizer.pad_token_id == 0 and f30k_tokenizer.unk_token_id == 3
    assert (f30k_tokenizer.bos_token, f30k_tokenizer.eos_token) == ("<start>", "<end>")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ('{"word2idx": {}}', "keys"),
        ('{"word2idx": {"<pad>": 0, "a": 2}, "idx2word": {"0": "<pad>", "2": "a"}, "idx": 2}', "ids must be"),
        ('{"word2idx": {"<pad>": 0, "a": 1}, "idx2word": {"0": "<pad>", "1": "b"}, "idx": 2}', "does not invert"),
        ('{"word2idx": {"<pad>": 0, "a": 1}, "idx2word": {"0": "<pad>", "1": "a"}, "idx": 2}', "special tokens"),
    ],
)
def test_load_scan_vocabulary_rejects_malformed(tmp_path, content, message):
    path = tmp_path / "broken_vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"broken_vocab.json.*{message}"):
        load_scan_vocabulary(path)


def test_build_vocabulary_hand_checked():
    captions = ["A dog runs.", "a DOG sits", "The cat runs!", "a cat", "the end"]
    # counts: a 3; cat, dog, runs, the 2; sits, end 1.
    assert build_vocabulary(captions, min_count=2) == {
        "<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "cat": 5, "dog": 6, "runs": 7, "the": 8,
    }
    assert list(build_vocabulary(captions, min_count=3)) == ["<pad>", "<start>", "<end>", "<unk>", "a"]


def test_built_tokenizer_save_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(build_vocabulary(["a dog runs"] * 4))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("A dog flies")["input_ids"] == [1, 4, 5, 3, 2]
    assert loaded.convert_ids_to_tokens([1, 4, 5, 6, 2]) == ["<start>", "a", "dog", "runs", "<end>"]


# Python's `unicodedata` and the Rust `tokenizers` crate ship different Unicode versions, which disagree on the
# category of some recent combining marks (first at U+07FD); below U+0700 both agree on every code point.
_pieces = st.one_of(
    st.text(st.characters(max_codepoint=0x6FF, exclude_categories=["Cs"]), max_size=6),
    st.sampled_from(["'s", "n't", "'ll", "-", "--", " ", "white-walled", "<end>", "<unk>", "Ü", "ﬁ", "Ⅻ", "’"]),
)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(_pieces, max_size=8).map("".join))
def test_tokenizer_equals_tokenize_caption(f30k_tokenizer, text):
    words = tokenize_caption(text)
    backend = f30k_tokenizer.backend_tokenizer
    pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    assert [piece for piece, _ in pieces] == words
    tokens = f30k_tokenizer.convert_ids_to_tokens(f30k_tokenizer(text)["input_ids"])
    assert tokens == ["<start>"] + [word if word in f30k_tokenizer.vocab else "<unk>" for word in words] + ["<end>"]
