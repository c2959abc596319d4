"""Parse a data set's captions once and keep the dependency heads on disk, so training never re-parses."""

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping

from .progress import progress_bar

from .processing_mpsm import DependencyParser, caption_key, get_dependency_parser, tokenize_caption


class ParseCache(MutableMapping):
    """On-disk map from a tokenised caption (`caption_key(words)`) to the head index of each of its words.

    Stored as JSON lines, `{"caption": key, "heads": [...]}` per line. `save()` rewrites the file atomically (temporary
    file in the same directory, then `os.replace`), so an interrupted run never leaves a truncated cache. Assign it to
    `MPSMProcessor.parse_cache` to make the processor look parses up here before parsing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._heads: dict[str, list[int]] = {}
        if os.path.exists(self.path):
            self._load()

    def _load(self):
        with open(self.path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._heads[record["caption"]] = [int(head) for head in record["heads"]]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"{self.path}, line {number}: not a parse cache record ({error!r}).") from None

    def save(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False) as file:
            for caption, heads in self._heads.items():
                file.write(json.dumps({"caption": caption, "heads": heads}) + "\n")
        os.replace(file.name, self.path)

    def __getitem__(self, key: str) -> list[int]:
        return self._heads[key]

    def __setitem__(self, key: str, heads: list[int]):
        self._heads[key] = [int(head) for head in heads]

    def __delitem__(self, key: str):
        del self._heads[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)


def parse_captions(
    captions: Iterable[str],
    parser: DependencyParser | str = "spacy:en_core_web_sm",
    cache: ParseCache | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> list[list[int]]:
    """Dependency heads of every caption (aligned to `tokenize_caption`), parsing only captions missing from `cache`.

    New parses are added to `cache`, which is saved at the end (also when interrupted).
    """
    if isinstance(parser, str):
        parser = get_dependency_parser(parser)
    cache = cache if cache is not None else {}
    keys = [caption_key(tokenize_caption(caption)) for caption in captions]
    missing = [key for key in dict.fromkeys(keys) if key not in cache]
    try:
        with progress_bar(total=len(missing), desc="Parsing captions", unit="caption", disable=not progress) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                for key, heads in zip(batch, parser.parse_batch([key.split(" ") if key else [] for key in batch])):
                    cache[key] = heads
                bar.update(len(batch))
    finally:
        if missing and isinstance(cache, ParseCache):
            cache.save()
    return [list(cache[key]) for key in keys]
