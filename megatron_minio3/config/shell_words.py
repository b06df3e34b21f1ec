"""Read a shell script the way bash would, far enough to take one command's arguments out of it.

    commands = parse_script(text, lookup, assign)    # every simple command, its words expanded

What is understood: backslash-newline continuations, single and double quotes (a word may join several quoted
and unquoted parts: 'a={'image': 12}' is the word a={image: 12}, as in bash), backslash escapes, comments,
`$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME-default}` (outside single quotes), commands separated by
newlines, `;`, `&`, `&&`, `|` and `||`, redirections (`> file`, `2>&1`, ...) dropped with their targets, and
variable assignments: `NAME=value` and `export NAME=value` alone take effect for the commands after them,
`NAME=value cmd ...` is kept as that command's environment. Unquoted expansions are not split into several
words. Command substitution (`$(...)`, backquotes) and positional parameters are refused with their line.
A variable that is neither set nor defaulted is recorded on the word (`Word.unset`) and left as `${NAME}`:
only the caller knows whether that command matters.
Standard library only (the config package imports nothing else of megatron_minio3).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = ("&&", "||", ";", "&", "|")

Lookup = Callable[[str], "str | None"]


class ShellSyntaxError(ValueError):
    """The script cannot be read; the message names the line."""


@dataclass
class Word:
    text: str
    line: int  # 1-based line where the word starts
    unset: list[str] = field(default_factory=list)  # variables it refers to that have no value
    assignable: bool = False  # NAME=... with NAME and `=` unquoted: an assignment when it leads a command


@dataclass
class Command:
    words: list[Word]  # after the leading NAME=value assignments
    line: int
    assignments: dict[str, str] = field(default_factory=dict)  # NAME=value words before the command name

    @property
    def texts(self) -> list[str]:
        return [w.text for w in self.words]


class _Reader:
    def __init__(self, text: str, lookup: Lookup, line: int = 1):
        self.text = text
        self.pos = 0
        self.line = line
        self.lookup = lookup

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def take(self) -> str:
        char = self.text[self.pos]
        self.pos += 1
        if char == "\n":
            self.line += 1
        return char

    def at_operator(self) -> bool:
        return any(self.text.startswith(op, self.pos) for op in _OPERATORS)

    def error(self, message: str) -> ShellSyntaxError:
        return ShellSyntaxError(f"line {self.line}: {message}")

    def expansion(self, word: Word) -> str:
        """After a `$` (already taken): the value it expands to."""
        char = self.peek()
        if char == "(":
            raise self.error("command substitution $(...) is not supported; write the value itself")
        if char == "{":
            self.take()
            end = self.text.find("}", self.pos)
            if end < 0:
                raise self.error("${ without its closing }")
            body = self.text[self.pos:end]
            while self.pos <= end:
                self.take()
            return self._braced(body, word)
        match = _NAME_RE.match(self.text, self.pos)
        if match:
            while self.pos < match.end():
                self.take()
            return self._value(match.group(0), word)
        if char and (char.isdigit() or char in "@*#?!$-"):
            raise self.error(f"${char} (a shell parameter) is not supported; write the value itself")
        return "$"  # a lone dollar is literal

    def _braced(self, body: str, word: Word) -> str:
        match = _NAME_RE.match(body)
        if not match:
            raise self.error(f"${{{body}}} is not a variable reference this reader understands")
        name, rest = match.group(0), body[match.end():]
        if not rest:
            return self._value(name, word)
        for operator in (":-", "-"):
            if rest.startswith(operator):
                value = self.lookup(name)
                if value is None or (operator == ":-" and value == ""):
                    return _expand_default(rest[len(operator):], self.lookup, word, self.line)
                return value
        raise self.error(f"${{{body}}}: only ${{NAME}}, ${{NAME:-default}} and ${{NAME-default}} are understood")

    def _value(self, name: str, word: Word) -> str:
        value = self.lookup(name)
        if value is None:
            word.unset.append(name)
            return "${" + name + "}"
        return value


def _expand_default(text: str, lookup: Lookup, word: Word, line: int) -> str:
    """The default of ${NAME:-default}: its expansions done, its quotes removed (no `}` inside it)."""
    reader = _Reader(text, lookup, line)
    out = []
    while reader.pos < len(text):
        char = reader.take()
        if char == "$":
            out.append(reader.expansion(word))
        elif char in "'\"":
            while reader.peek() and reader.peek() != char:
                inner = reader.take()
                out.append(reader.expansion(word) if inner == "$" and char == '"' else inner)
            if not reader.peek():
                raise reader.error(f"unterminated {char} in a ${{...}} default")
            reader.take()
        elif char == "\\" and reader.peek():
            out.append(reader.take())
        else:
            out.append(char)
    return "".join(out)


def parse_script(text: str, lookup: Lookup, assign: Callable[[str, str], None] | None = None) -> list[Command]:
    """Every simple command of `text` with its words expanded (see the module docstring). `lookup(name)` gives a
    variable's value or None; `assign(name, value)` is called for each assignment command, in order, so a
    lookup that reads what assign wrote sees the values as bash would."""
    reader = _Reader(text, lookup)
    commands: list[Command] = []
    words: list[Word] = []
    redirect_target = False  # the next word is a redirection's file

    def end_command() -> None:
        if not words:
            return
        leading = 0
        while leading < len(words) and words[leading].assignable:
            leading += 1
        pairs = [tuple(w.text.split("=", 1)) for w in words[:leading]]
        rest = words[leading:]
        if rest and rest[0].text == "export" and all(w.assignable or _NAME_RE.fullmatch(w.text) for w in rest[1:]):
            pairs += [tuple(w.text.split("=", 1)) for w in rest[1:] if w.assignable]
            rest = []
        if not rest:  # an assignment command: the commands after it see the values
            if assign is not None:
                for name, value in pairs:
                    assign(name, value)
        else:  # prefix assignments: this command's environment only
            commands.append(Command(list(rest), words[0].line, dict(pairs)))
        words.clear()

    while reader.pos < len(text):
        char = reader.peek()
        if char == "\\" and reader.peek(1) == "\n":
            reader.take()
            reader.take()
        elif char in " \t\r":
            reader.take()
        elif char == "\n":
            reader.take()
            end_command()
        elif char == "#":  # a comment (only where a word would start)
            while reader.peek() and reader.peek() != "\n":
                reader.take()
        elif reader.at_operator():
            operator = next(op for op in _OPERATORS if text.startswith(op, reader.pos))
            for _ in operator:
                reader.take()
            end_command()
        elif char in "<>":
            if words and words[-1].text.isdigit() and text[reader.pos - 1].isdigit():
                words.pop()  # the fd of 2>...
            reader.take()
            while reader.peek() in (">", "|"):
                reader.take()
            if reader.peek() == "&":  # >&1: the target is written in place
                reader.take()
                while reader.peek().isdigit() or reader.peek() == "-":
                    reader.take()
            else:
                redirect_target = True
        else:
            word = _read_word(reader)
            if redirect_target:
                redirect_target = False
            else:
                words.append(word)
    end_command()
    return commands


def _read_word(reader: _Reader) -> Word:
    word = Word("", reader.line)
    parts: list[str] = []
    equals_unquoted: bool | None = None  # whether the word's first `=` was written unquoted

    def quoted(text: str) -> None:
        nonlocal equals_unquoted
        parts.append(text)
        if equals_unquoted is None and "=" in text:
            equals_unquoted = False

    while reader.pos < len(reader.text):
        char = reader.peek()
        if char in " \t\r\n<>" or reader.at_operator():
            break
        if char == "\\":
            reader.take()
            if reader.peek() == "\n":
                reader.take()  # a continuation inside a word
            elif reader.peek():
                quoted(reader.take())
        elif char == "'":
            reader.take()
            start_line, chunk = reader.line, []
            while reader.peek() != "'":
                if not reader.peek():
                    raise ShellSyntaxError(f"line {start_line}: unterminated single quote")
                chunk.append(reader.take())
            reader.take()
            quoted("".join(chunk))
        elif char == '"':
            reader.take()
            start_line, chunk = reader.line, []
            while reader.peek() != '"':
                inner = reader.peek()
                if not inner:
                    raise ShellSyntaxError(f"line {start_line}: unterminated double quote")
                if inner == "\\" and reader.peek(1) in ("$", "`", '"', "\\", "\n"):
                    reader.take()
                    escaped = reader.take()
                    if escaped != "\n":
                        chunk.append(escaped)
                elif inner == "`":
                    raise reader.error("command substitution `...` is not supported; write the value itself")
                else:
                    reader.take()
                    chunk.append(reader.expansion(word) if inner == "$" else inner)
            reader.take()
            quoted("".join(chunk))
        elif char == "`":
            raise reader.error("command substitution `...` is not supported; write the value itself")
        else:
            reader.take()
            if char == "=" and equals_unquoted is None:
                equals_unquoted = True
            parts.append(reader.expansion(word) if char == "$" else char)
    word.text = "".join(parts)
    word.assignable = bool(equals_unquoted) and bool(_ASSIGNMENT_RE.match(word.text))
    return word


def fenced_blocks(markdown: str) -> list[str]:
    """The contents of the ``` fenced code blocks of a Markdown text (any info string), in order."""
    return [m.group(1) for m in re.finditer(r"^```[^\n]*\n(.*?)^```", markdown, re.DOTALL | re.MULTILINE)]
