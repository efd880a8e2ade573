"""Which context tokens carry a concept's class word in the base prompt (pure, host-free)."""

from __future__ import annotations

from typing import Sequence


def find_word(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[list[int]]:
    """Every occurrence of the word's token ids in the prompt's, as lists of positions."""
    n = len(word_ids)
    if n == 0:
        return []
    found, i = [], 0
    while i + n <= len(prompt_ids):
        if list(prompt_ids[i:i + n]) == list(word_ids):
            found.append(list(range(i, i + n)))
            i += n
        else:
            i += 1
    return found


def assign_occurrences(class_words: Sequence[str], occurrences: dict[str, list[list[int]]]) -> list[list[int]]:
    """Concept i with class word w takes the k-th occurrence of w when it is the k-th concept
    with that word ("a man and a man": two subjects); with fewer occurrences than concepts the
    concepts share the last one and are told apart in space (see `masks_from_maps`)."""
    seen: dict[str, int] = {}
    picked = []
    for word in class_words:
        k = seen.get(word, 0)
        seen[word] = k + 1
        spots = occurrences.get(word) or []
        picked.append(spots[min(k, len(spots) - 1)] if spots else [])
    return picked
