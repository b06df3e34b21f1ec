"""Texts given as files in a config (data.template_files, reward.judge.prompt_files), read at load time."""
from __future__ import annotations


def read_text_files(files: dict[str, str], allowed: tuple[str, ...], key: str, noun: str) -> dict[str, str]:
    """{name: the text of its file}, each file's text exactly, less one final line end (which editors add).
    ValueError naming `key` (e.g. "data.template_files"), the entry (a `noun`, e.g. "template") and the file."""
    texts = {}
    for name, path in sorted(files.items()):
        if name not in allowed:
            raise ValueError(f"{key}: unknown {noun} {name!r}; choose from {', '.join(allowed)}")
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{key}.{name}: cannot read {path}: {err}") from None
        for ending in ("\r\n", "\n"):
            if text.endswith(ending):
                text = text[: -len(ending)]
                break
        texts[name] = text
    return texts
