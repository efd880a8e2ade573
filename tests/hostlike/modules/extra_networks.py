"""A1111's `<name:args>` prompt tags: parse_prompt -> (prompt without tags, {name: [params]})."""

import re
from types import SimpleNamespace

TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    found = {}

    def take(m):
        found.setdefault(m.group(1), []).append(SimpleNamespace(items=m.group(2).split(":")))
        return ""
    return TAG.sub(take, prompt), found
