"""Word vocabulary of MPSM (SCAN convention) and the `PreTrainedTokenizerFast` that holds it."""

import json
import os
from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..processing_mpsm import WORD_PATTERN, tokenize_caption


__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "build_vocabulary", "load_scan_vocabulary", "tokenize_caption"]

# Ids 0-3, as in SCAN/SGRAF vocabularies.
SPECIAL_TOKENS = ["<pad>", "<start>", "<end>", "<unk>"]


def build_vocabulary(captions: Iterable[str], min_count: int = 4) -> dict[str, int]:
    """Word -> id for the words of `captions` seen at least `min_count` times.

    Ids: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3, then words by descending count, ties alphabetically.
    """
    counts = Counter(word for caption in captions for word in tokenize_caption(caption))
    words = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}


def load_scan_vocabulary(path: str | os.PathLike) -> dict[str, int]:
    """Read a SCAN/SGRAF `*_precomp_vocab.json` (`{"word2idx", "idx2word", "idx"}`) and return its word2idx as-is."""

    def malformed(reason: str) -> ValueError:
        return ValueError(f"{os.fspath(path)} is not a SCAN vocabulary file: {reason}.")

    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise malformed(f"invalid JSON ({error})") from None
    if not isinstance(data, dict) or not {"word2idx", "idx2word", "idx"} <= data.keys():
        raise malformed('expected an object with keys "word2idx", "idx2word" and "idx"')
    word2idx, idx2word = data["word2idx"], data["idx2word"]
    if not isinstance(word2idx, dict) or not all(isinstance(i, int) for i in word2idx.values()):
        raise malformed('"word2idx" must map words to integer ids')
    if sorted(word2idx.values()) != list(range(len(word2idx))) or data["idx"] != len(word2idx):
        raise malformed(f'ids must be 0..{len(word2idx) - 1} with "idx" = {len(word2idx)}, got "idx" = {data["idx"]}')
    if not isinstance(idx2word, dict) or any(idx2word.get(str(i)) != word for word, i in word2idx.items()):
        raise malformed('"idx2word" does not invert "word2idx"')
    missing = [token for token in SPECIAL_TOKENS if token not in word2idx]
    if missing:
        raise malformed(f"special tokens {missing} are missing")
    return dict(word2idx)


def build_tokenizer(word2idx: dict[str, int]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `word2idx` whose tokens are `["<start>", *tokenize_caption(text), "<end>"]`.

    Literal special-token strings in the text ("<end>") are tokenised as words, like `tokenize_caption` does.
    """
    missing = [token for token in SPECIAL_TOKENS if token not in word2idx]
    if missing:
        raise ValueError(f"`word2idx` lacks the special tokens {missing}.")
    backend = Tokenizer(models.WordLevel(vocab=dict(word2idx), unk_token="<unk>"))
    # Same steps as `processing_mpsm.normalize_caption` and `tokenize_caption`.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)
    start, end = ("<start>", word2idx["<start>"]), ("<end>", word2idx["<end>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", pair="<start> $A <end> $B:1 <end>:1", special_tokens=[start, end]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<start>",
        eos_token="<end>",
        unk_token="<unk>",
        pad_token="<pad>",
        split_special_tokens=True,
        model_input_names=["input_ids", "attention_mask"],
    )
