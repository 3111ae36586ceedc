"""The domains of the expert zoo: tasks with exact answers, and text that ships with Python.

Each task domain draws examples `prompt=answer` from a seeded generator; an example belongs to the
held-out split when a hash of its prompt says so, so training and evaluation prompts never overlap
and both are the same on every machine. The two text domains cut the standard library's source
files (code) and its docstrings (prose) into lines; whole files are assigned to a split by a hash of
their path.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import sysconfig
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

HELD_OUT_PERCENT = 20
ANSWER_MARK = "="


@dataclasses.dataclass(frozen=True)
class Domain:
    """One expert's domain: a task with exact answers, or text scored by perplexity."""

    name: str
    kind: str  # "task" or "text"
    make: Callable[[random.Random], tuple[str, str]] | None = None  # task: rng -> (prompt, answer)
    description: str = ""


def is_held_out(key: str) -> bool:
    """The split rule: a stable hash of the prompt (or file path) puts 20% in held-out."""
    return zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT


def task_examples(
    domain: Domain, count: int, split: str, seed: int, at_most: bool = False
) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs of a task domain from one split ("train" or "eval").

    Evaluation prompts are distinct; training draws may repeat (small domains are memorized).
    With `at_most`, a domain with fewer than `count` distinct prompts in the split gives all it
    has (the first `count` are the same either way).
    """
    rng = random.Random(f"{domain.name}/{split}/{seed}")
    held_out = split == "eval"
    examples: dict[str, str] | list[tuple[str, str]] = {} if held_out else []
    for _ in range(200 * count):
        if len(examples) == count:
            return list(examples.items()) if held_out else examples
        prompt, answer = domain.make(rng)
        if is_held_out(prompt) != held_out:
            continue
        if held_out:
            examples.setdefault(prompt, answer)
        else:
            examples.append((prompt, answer))
    if at_most and held_out:
        return list(examples.items())
    raise ValueError(f"domain {domain.name!r} has fewer than {count} distinct {split} prompts")


def format_example(prompt: str, answer: str) -> str:
    """The text a model is trained on: `prompt=answer` and a newline."""
    return f"{prompt}{ANSWER_MARK}{answer}\n"


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}", str(a + b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(2, 25), rng.randrange(2, 25)
    return f"{a}*{b}", str(a * b)


def _modulo(rng: random.Random) -> tuple[str, str]:
    a, m = rng.randrange(10, 200), rng.randrange(2, 10)
    return f"{a}%{m}", str(a % m)


def _letters(rng: random.Random, low: int, high: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reversal(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 6, "abcdefghij")
    return f"rev {word}", word[::-1]


def _sorting(rng: random.Random) -> tuple[str, str]:
    digits = _letters(rng, 3, 6, "0123456789")
    return f"sort {digits}", "".join(sorted(digits))


def _closing_brackets(rng: random.Random) -> tuple[str, str]:
    pairs = {"(": ")", "[": "]", "{": "}"}
    opened = _letters(rng, 2, 5, "([{")
    return f"close {opened}", "".join(pairs[c] for c in reversed(opened))


def _counting(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 4, 9, "abc")
    letter = rng.choice("abc")
    return f"count {letter} {text}", str(text.count(letter))


def _successor(rng: random.Random) -> tuple[str, str]:
    number = rng.randrange(1000)
    return f"next {number}", str(number + 1)


DOMAINS: tuple[Domain, ...] = (
    Domain("addition", "task", _addition, "a+b for a, b < 100"),
    Domain("multiplication", "task", _multiplication, "a*b for a, b in 2..24"),
    Domain("modulo", "task", _modulo, "a%m for a < 200, m in 2..9"),
    Domain("reversal", "task", _reversal, "reverse 3-6 letters"),
    Domain("sorting", "task", _sorting, "sort 3-6 digits"),
    Domain("brackets", "task", _closing_brackets, "close 2-5 open brackets"),
    Domain("counting", "task", _counting, "count a letter in 4-9 letters"),
    Domain("successor", "task", _successor, "n+1 for n < 1000"),
    Domain("code", "text", description="lines of the Python standard library's source"),
    Domain("prose", "text", description="the Python standard library's docstrings"),
)


def domain(name: str) -> Domain:
    for d in DOMAINS:
        if d.name == name:
            return d
    raise ValueError(f"unknown domain {name!r}; known: {', '.join(d.name for d in DOMAINS)}")


def stdlib_files() -> list[Path]:
    """The standard library's top-level .py files, sorted (the same for one Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


@cache
def text_lines(name: str, split: str) -> tuple[str, ...]:
    """Non-blank lines of code ("code") or docstrings ("prose") from one split of the stdlib."""
    held_out = split == "eval"
    lines: list[str] = []
    for path in stdlib_files():
        if is_held_out(path.name) != held_out:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        text = source if name == "code" else "\n".join(_docstrings(source))
        lines.extend(line.rstrip() for line in text.splitlines() if line.strip())
    return tuple(lines)


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return list(dict.fromkeys(doc for doc in docs if doc))
