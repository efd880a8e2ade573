"""Prompt variants (Concept Conductor): a concept's branch prompt made from the main prompt.

A concept with identity words (`token`, e.g. "alice woman", usually its LoRA's trigger words)
and no prompt of its own gets the main prompt with EVERY concept's class word replaced by its
identity words, so its branch draws only its own subject:
"a man and a woman on a beach" (class words man, woman; token "alice woman")
-> "a alice woman and a alice woman on a beach".
Words match whole and in any case; extra-network tags (`<lora:woman_style:0.5>`) are left as they are.
"""

from __future__ import annotations

import re
from typing import Sequence

_TAG = re.compile(r"<[^<>]*>")


def _words(words: Sequence[str]) -> re.Pattern | None:
    """One pattern for all the words, longest first ("young woman" before "woman")."""
    unique = sorted({w.strip() for w in words if w and w.strip()}, key=len, reverse=True)
    if not unique:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in unique) + r")(?!\w)", re.IGNORECASE)


def _outside_tags(text: str, change) -> str:
    parts, at = [], 0
    for tag in _TAG.finditer(text):
        parts += [change(text[at:tag.start()]), tag.group(0)]
        at = tag.end()
    return "".join(parts + [change(text[at:])])


def has_word(prompt: str, word: str) -> bool:
    """Whether `word` is a whole word of the prompt (any case), outside extra-network tags."""
    pattern = _words([word])
    return bool(pattern and pattern.search(_TAG.sub(" ", prompt)))


def prompt_variant(prompt: str, class_words: Sequence[str], token: str) -> str:
    """The prompt with every class word replaced by `token`."""
    pattern = _words(class_words)
    if pattern is None or not token.strip():
        return prompt
    replacement = token.strip()
    return _outside_tags(prompt, lambda text: pattern.sub(lambda _: replacement, text))


def concept_variant(prompt: str, concepts, index: int) -> str | None:
    """Concept `index`'s branch prompt for this main prompt, or None where no variant applies:
    it has its own prompt or no identity words, or its class word is not in the prompt (then
    its branch takes the main prompt). `concepts`: the job's ConceptSpecs."""
    spec = concepts[index]
    if spec.prompt or not spec.token or not spec.class_word or not has_word(prompt, spec.class_word):
        return None
    return prompt_variant(prompt, [c.class_word for c in concepts], spec.token)
