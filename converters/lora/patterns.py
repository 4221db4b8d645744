"""Module-name patterns from a LoRA file (PEFT's ``alpha_pattern``), matched without backtracking.

A pattern in a downloaded file is data, not code: Python's ``re`` backtracks, so a pattern such
as ``([\\w.]+)+!`` takes exponential time on a long module name (ReDoS). This module compiles the
regular-expression subset PEFT configs use into a small NFA program and runs it by Thompson's
simulation (every live state advanced together, one input character at a time): the time is at
most ``len(name) × len(program)`` whatever the pattern, and the program is bounded in size.

Supported: literal characters, ``.``, escapes (``\\d \\D \\w \\W \\s \\S`` and escaped punctuation),
character classes (``[a-z_]``, ``[^.]``), groups (``(...)``, ``(?:...)``, ``(?P<name>...)``),
alternation ``|``, quantifiers ``* + ?`` (lazy forms match the same names) and ``{m}``, ``{m,}``,
``{m,n}``, a leading ``^`` and a trailing ``$``. Anything else (back-references, look-arounds,
inline flags, anchors inside the pattern) is refused with a :class:`~svdq_format.errors.LoRAError`.

PEFT's rule: a pattern ``p`` applies to module ``m`` when ``(.*\\.)?(p)`` matches the whole of
``m``; the first pattern (in file order) that applies wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from svdq_format.errors import LoRAError

__all__ = ["MAX_PATTERN_CHARS", "MAX_PATTERNS", "ModulePattern", "compile_module_pattern", "compile_patterns",
           "first_match"]

#: Longest pattern accepted (characters).
MAX_PATTERN_CHARS = 1000
#: Most patterns accepted in one mapping.
MAX_PATTERNS = 100_000
#: Largest compiled program (instructions) of one pattern: bounds the time per module name.
_MAX_PROGRAM = 20_000
#: Largest repeat count of ``{m,n}``.
_MAX_REPEAT = 100

_Pred = Callable[[str], bool]


class _PatternError(ValueError):
    pass


# --------------------------------------------------------------------------- parse


@dataclasses.dataclass(frozen=True)
class _Char:
    pred: _Pred


@dataclasses.dataclass(frozen=True)
class _Alt:
    options: list[list[tuple[object, int, int]]]  # each option: a sequence of (node, min, max or -1)


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CLASSES: dict[str, _Pred] = {
    "d": str.isdigit,
    "D": lambda c: not c.isdigit(),
    "w": _is_word,
    "W": lambda c: not _is_word(c),
    "s": str.isspace,
    "S": lambda c: not c.isspace(),
}


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        c = self.s[self.i]
        self.i += 1
        return c

    def parse(self) -> _Alt:
        node = self.alt()
        if self.i != len(self.s):
            raise _PatternError(f"unbalanced ')' at {self.i}")
        return node

    def alt(self) -> _Alt:
        self.depth += 1
        if self.depth > 50:
            raise _PatternError("groups nested more than 50 deep")
        options = [self.seq()]
        while self.peek() == "|":
            self.take()
            options.append(self.seq())
        self.depth -= 1
        return _Alt(options)

    def seq(self) -> list[tuple[object, int, int]]:
        out: list[tuple[object, int, int]] = []
        while (c := self.peek()) is not None and c not in "|)":
            atom = self.atom()
            lo, hi = self.quantifier()
            out.append((atom, lo, hi))
        return out

    def quantifier(self) -> tuple[int, int]:
        c = self.peek()
        if c == "*":
            lo, hi = 0, -1
        elif c == "+":
            lo, hi = 1, -1
        elif c == "?":
            lo, hi = 0, 1
        elif c == "{":
            return self.counted()
        else:
            return 1, 1
        self.take()
        if self.peek() == "?":  # lazy: the same set of whole matches
            self.take()
        if self.peek() in ("*", "+", "?", "{"):
            raise _PatternError(f"multiple repeat at {self.i}")
        return lo, hi

    def counted(self) -> tuple[int, int]:
        end = self.s.find("}", self.i)
        body = self.s[self.i + 1:end] if end > 0 else ""
        lo_s, comma, hi_s = body.partition(",")
        if end < 0 or not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise _PatternError(f"unsupported '{{' at {self.i} (only {{m}}, {{m,}}, {{m,n}})")
        lo = int(lo_s)
        hi = (int(hi_s) if hi_s else -1) if comma else lo
        if lo > _MAX_REPEAT or hi > _MAX_REPEAT or (hi >= 0 and hi < lo):
            raise _PatternError(f"repeat count {{{body}}} out of range (at most {_MAX_REPEAT})")
        self.i = end + 1
        if self.peek() == "?":
            self.take()
        return lo, hi

    def atom(self) -> object:
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                if self.s.startswith("?:", self.i):
                    self.i += 2
                elif self.s.startswith("?P<", self.i) and (close := self.s.find(">", self.i)) > 0:
                    self.i = close + 1
                else:
                    raise _PatternError(f"unsupported group '(?' at {self.i - 1}")
            node = self.alt()
            if self.peek() != ")":
                raise _PatternError("missing ')'")
            self.take()
            return node
        if c == "[":
            return _Char(self.char_class())
        if c == "\\":
            return _Char(self.escape())
        if c == ".":
            return _Char(lambda ch: ch != "\n")
        if c in "*+?{":
            raise _PatternError(f"nothing to repeat at {self.i - 1}")
        if c in "^$":
            raise _PatternError(f"anchor {c!r} inside the pattern (only a leading '^' and a trailing '$')")
        return _Char(c.__eq__)

    def escape(self) -> _Pred:
        if self.peek() is None:
            raise _PatternError("pattern ends with '\\'")
        c = self.take()
        if c in _CLASSES:
            return _CLASSES[c]
        if c.isalnum():
            raise _PatternError(f"unsupported escape '\\{c}'")
        return c.__eq__

    def char_class(self) -> _Pred:
        negate = self.peek() == "^"
        if negate:
            self.take()
        preds: list[_Pred] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise _PatternError("unterminated character set")
            if c == "]" and not first:
                self.take()
                break
            first = False
            self.take()
            if c == "\\":
                preds.append(self.escape())
                continue
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                self.take()
                hi = self.take()
                if hi == "\\":
                    raise _PatternError("escape as a range end")
                if hi < c:
                    raise _PatternError(f"bad character range {c}-{hi}")
                preds.append(_in_range(c, hi))
            else:
                preds.append(c.__eq__)
        if negate:
            return lambda ch: ch != "\n" and not any(p(ch) for p in preds)
        return lambda ch: any(p(ch) for p in preds)


def _in_range(lo: str, hi: str) -> _Pred:
    return lambda ch: lo <= ch <= hi


# --------------------------------------------------------------------------- compile (Pike VM program)

# instructions: ("char", pred) | ("split", a, b) | ("jmp", a) | ("match",)


class _Compiler:
    def __init__(self) -> None:
        self.prog: list[list[object]] = []

    def emit(self, *ins: object) -> int:
        if len(self.prog) >= _MAX_PROGRAM:
            raise _PatternError(f"pattern too large (more than {_MAX_PROGRAM} states)")
        self.prog.append(list(ins))
        return len(self.prog) - 1

    def node(self, n: object) -> None:
        if isinstance(n, _Char):
            self.emit("char", n.pred)
            return
        assert isinstance(n, _Alt)
        jumps: list[int] = []
        for k, option in enumerate(n.options):
            split = self.emit("split", 0, 0) if k < len(n.options) - 1 else -1
            start = len(self.prog)
            for atom, lo, hi in option:
                self.repeat(atom, lo, hi)
            if split >= 0:
                jumps.append(self.emit("jmp", 0))
                self.prog[split][1:] = [start, len(self.prog)]
        for j in jumps:
            self.prog[j][1] = len(self.prog)

    def repeat(self, atom: object, lo: int, hi: int) -> None:
        for _ in range(lo):
            self.node(atom)
        if hi < 0:  # a star: L: split body, out; body; jmp L
            loop = self.emit("split", 0, 0)
            self.node(atom)
            self.emit("jmp", loop)
            self.prog[loop][1:] = [loop + 1, len(self.prog)]
            return
        splits = []
        for _ in range(hi - lo):
            splits.append(self.emit("split", 0, 0))
            self.node(atom)
            self.prog[splits[-1]][1] = splits[-1] + 1
        for s in splits:
            self.prog[s][2] = len(self.prog)


@dataclasses.dataclass(frozen=True)
class ModulePattern:
    """A compiled module-name pattern (PEFT's rule: ``(.*\\.)?(pattern)`` matches the whole name)."""

    text: str
    literal: str
    program: tuple[tuple[object, ...], ...]

    def matches(self, module: str) -> bool:
        """Whether the pattern applies to ``module`` (time ≤ ``len(module) × len(program)``)."""
        if module == self.literal or module.endswith("." + self.literal):
            return True
        prog = self.program
        current = self._closure(prog, [0])
        for ch in module:
            step = []
            for pc in current:
                ins = prog[pc]
                if ins[0] == "char" and ins[1](ch):  # type: ignore[operator]  # a predicate
                    step.append(pc + 1)
            if not step:
                return False
            current = self._closure(prog, step)
        return any(prog[pc][0] == "match" for pc in current)

    @staticmethod
    def _closure(prog: Sequence[tuple[object, ...]], starts: list[int]) -> list[int]:
        seen: set[int] = set()
        out: list[int] = []
        stack = list(reversed(starts))
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = prog[pc]
            if ins[0] == "jmp":
                stack.append(ins[1])  # type: ignore[arg-type]
            elif ins[0] == "split":
                stack.extend((ins[2], ins[1]))  # type: ignore[arg-type]
            else:
                out.append(pc)
        return out


def _unescape_literal(text: str) -> str:
    """``text`` as a plain module name when it is one (``\\.`` read as ``.``), else ''."""
    plain = text.replace("\\.", ".")
    return plain if plain and all(_is_word(c) or c in ".-" for c in plain) else ""


def compile_module_pattern(text: object, *, where: str) -> ModulePattern:
    """Compile one pattern from a file.

    Args:
        text: The pattern (a key of ``alpha_pattern``).
        where: Named in the error (``<file>: alpha_pattern``).

    Raises:
        LoRAError: not a string, too long, or outside the supported syntax — one line.
    """
    if not isinstance(text, str):
        raise LoRAError(f"{where}: pattern {text!r} is not a string")
    if len(text) > MAX_PATTERN_CHARS:
        raise LoRAError(f"{where}: pattern of {len(text)} characters (at most {MAX_PATTERN_CHARS})")
    body = text[1:] if text.startswith("^") else text
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    try:
        prefix = _Parser(r".*\.").parse()  # PEFT's (.*\.)?(body), the body parsed on its own
        tree = _Alt([[(prefix, 0, 1), (_Parser(body).parse(), 1, 1)]])
        comp = _Compiler()
        comp.node(tree)
        comp.emit("match")
    except _PatternError as exc:
        raise LoRAError(f"{where}: pattern {text[:80]!r}: {exc}") from None
    return ModulePattern(text, _unescape_literal(body), tuple(tuple(i) for i in comp.prog))


def compile_patterns(patterns: object, *, where: str) -> list[tuple[ModulePattern, object]]:
    """Compile a ``{pattern: value}`` mapping from a file (in file order).

    Raises:
        LoRAError: not an object, too many entries, or a bad pattern.
    """
    if patterns is None:
        return []
    if not isinstance(patterns, Mapping):
        raise LoRAError(f"{where}: not an object of patterns (got {type(patterns).__name__})")
    if len(patterns) > MAX_PATTERNS:
        raise LoRAError(f"{where}: {len(patterns)} patterns (at most {MAX_PATTERNS})")
    return [(compile_module_pattern(k, where=where), v) for k, v in patterns.items()]


def first_match(patterns: Sequence[tuple[ModulePattern, object]], module: str) -> object | None:
    """The value of the first pattern that applies to ``module`` (None: none applies)."""
    for pat, value in patterns:
        if pat.matches(module):
            return value
    return None
