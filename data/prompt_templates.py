"""Templates and fact tables behind ``PromptGenerator``; each builder draws from an ``rng``.

Every builder returns ``(text, completion, answer, meta)``: the prompt, its expected
continuation, the bare answer (or None) and the slot values. Arithmetic answers are
computed from the drawn numbers (``meta["expression"]`` evaluates to the answer); code
completions carry a test case (``meta["check"]``) that their completion passes.
"""

from __future__ import annotations

import random
from typing import Any, Callable

Built = tuple[str, str | None, str | None, dict[str, Any]]

NAMES = (
    ("Maya", "she"),
    ("Liam", "he"),
    ("Aisha", "she"),
    ("Noah", "he"),
    ("Sofia", "she"),
    ("Omar", "he"),
    ("Elena", "she"),
    ("Kenji", "he"),
    ("Zara", "she"),
    ("Tomás", "he"),
    ("Priya", "she"),
    ("Felix", "he"),
)
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "stamps", "cards", "balloons")


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES)


def arithmetic_add(rng: random.Random) -> Built:
    (name, he), item = _person(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    text = f"{name} has {a} {item}. {he.capitalize()} gets {b} more. How many {item} does {name} have now?"
    return text, f" {a + b}", str(a + b), {"operation": "add", "operands": [a, b], "expression": f"{a} + {b}"}


def arithmetic_subtract(rng: random.Random) -> Built:
    (name, _), item = _person(rng), rng.choice(ITEMS)
    friend = rng.choice([n for n, _ in NAMES if n != name])
    a = rng.randint(10, 199)
    b = rng.randint(1, a - 1)
    text = f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?"
    return text, f" {a - b}", str(a - b), {"operation": "subtract", "operands": [a, b], "expression": f"{a} - {b}"}


def arithmetic_multiply(rng: random.Random) -> Built:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 25), rng.randint(2, 12)
    text = f"A box holds {a} {item}. How many {item} are there in {b} boxes?"
    return text, f" {a * b}", str(a * b), {"operation": "multiply", "operands": [a, b], "expression": f"{a} * {b}"}


def arithmetic_divide(rng: random.Random) -> Built:
    (name, _), item = _person(rng), rng.choice(ITEMS)
    each, friends = rng.randint(2, 20), rng.randint(2, 9)
    total = each * friends
    text = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    meta = {"operation": "divide", "operands": [total, friends], "expression": f"{total} // {friends}"}
    return text, f" {each}", str(each), meta


def arithmetic_two_step(rng: random.Random) -> Built:
    (name, he), item = _person(rng), rng.choice(ITEMS)
    packs, per_pack = rng.randint(2, 9), rng.randint(3, 12)
    given = rng.randint(1, packs * per_pack - 1)
    answer = packs * per_pack - given
    text = (
        f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack, "
        f"then gives away {given}. How many {item} does {he} have left?"
    )
    meta = {
        "operation": "multiply_subtract",
        "operands": [packs, per_pack, given],
        "expression": f"{packs} * {per_pack} - {given}",
    }
    return text, f" {answer}", str(answer), meta


ARITHMETIC = (arithmetic_add, arithmetic_subtract, arithmetic_multiply, arithmetic_divide, arithmetic_two_step)

# (function name, arguments, docstring, body, test arguments, expected result as a function of k);
# "{k}" in the strings is a constant drawn per prompt.
CODE_FUNCTIONS: tuple[tuple[str, str, str, str, tuple, Callable[[int], Any]], ...] = (
    ("add_{k}", "x", "Return x plus {k}.", "return x + {k}", (5,), lambda k: 5 + k),
    ("times_{k}", "x", "Return x multiplied by {k}.", "return x * {k}", (3,), lambda k: 3 * k),
    (
        "is_multiple_of_{k}",
        "n",
        "Return True if n is divisible by {k}.",
        "return n % {k} == 0",
        (6 * 7,),
        lambda k: 42 % k == 0,
    ),
    ("repeat_{k}", "s", "Return the string s repeated {k} times.", "return s * {k}", ("ab",), lambda k: "ab" * k),
    ("reverse_string", "s", "Return the string s reversed.", "return s[::-1]", ("abc",), lambda k: "cba"),
    (
        "count_vowels",
        "s",
        "Return the number of vowels in s.",
        "return sum(c in 'aeiouAEIOU' for c in s)",
        ("Hello World",),
        lambda k: 3,
    ),
    ("factorial", "n", "Return n factorial.", "return 1 if n < 2 else n * factorial(n - 1)", (5,), lambda k: 120),
    (
        "is_palindrome",
        "s",
        "Return True if s reads the same forwards and backwards.",
        "return s == s[::-1]",
        ("level",),
        lambda k: True,
    ),
    (
        "mean",
        "values",
        "Return the arithmetic mean of a non-empty list of numbers.",
        "return sum(values) / len(values)",
        ([1, 2, 3, 6],),
        lambda k: 3.0,
    ),
    (
        "word_count",
        "text",
        "Return the number of whitespace-separated words in text.",
        "return len(text.split())",
        ("the quick brown fox",),
        lambda k: 4,
    ),
    (
        "celsius_to_fahrenheit",
        "c",
        "Convert a temperature from Celsius to Fahrenheit.",
        "return c * 9 / 5 + 32",
        (100,),
        lambda k: 212.0,
    ),
    (
        "flatten",
        "lists",
        "Return one list with the items of each list in lists, in order.",
        "return [x for sub in lists for x in sub]",
        ([[1, 2], [3]],),
        lambda k: [1, 2, 3],
    ),
)


def code_completion(rng: random.Random) -> Built:
    name, args, doc, body, test_args, expected = rng.choice(CODE_FUNCTIONS)
    k = rng.randint(2, 9)
    name, doc, body = (s.replace("{k}", str(k)) for s in (name, doc, body))
    text = f'def {name}({args}):\n    """{doc}"""\n'
    completion = f"    {body}\n"
    meta = {"function": name, "check": {"args": list(test_args), "expected": expected(k)}}
    return text, completion, body, meta


CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Peru", "Lima"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Turkey", "Ankara"),
)
ELEMENTS = (
    ("hydrogen", "H"),
    ("helium", "He"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("oxygen", "O"),
    ("sodium", "Na"),
    ("magnesium", "Mg"),
    ("silicon", "Si"),
    ("chlorine", "Cl"),
    ("potassium", "K"),
    ("calcium", "Ca"),
    ("iron", "Fe"),
    ("copper", "Cu"),
    ("silver", "Ag"),
    ("gold", "Au"),
    ("lead", "Pb"),
    ("tin", "Sn"),
    ("zinc", "Zn"),
    ("mercury", "Hg"),
)
FACTS = (
    ("The largest planet in the Solar System is", "Jupiter"),
    ("The planet closest to the Sun is", "Mercury"),
    ("At sea level, pure water freezes at", "0 degrees Celsius"),
    ("The play Hamlet was written by", "William Shakespeare"),
    ("The chemical formula of water is", "H2O"),
    ("The number of days in a leap year is", "366"),
    ("The longest river in Africa is", "the Nile"),
    ("The number of sides of a hexagon is", "six"),
)


def factual_sentence(rng: random.Random) -> Built:
    kind = rng.choice(("capital", "element", "fact"))
    if kind == "capital":
        country, answer = rng.choice(CAPITALS)
        text, meta = f"The capital of {country} is", {"kind": kind, "subject": country}
    elif kind == "element":
        element, answer = rng.choice(ELEMENTS)
        text, meta = f"The chemical symbol for {element} is", {"kind": kind, "subject": element}
    else:
        text, answer = rng.choice(FACTS)
        meta = {"kind": kind, "subject": text}
    return text, f" {answer}.", answer, meta


CHARACTERS = ("fox", "dragon", "robot", "princess", "fisherman", "owl", "little girl", "old sailor", "rabbit", "giant")
ADJECTIVES = ("curious", "brave", "lonely", "clever", "tiny", "grumpy", "kind", "sleepy")
PLACES = (
    "in a quiet village",
    "at the edge of a dark forest",
    "on a small island",
    "high in the mountains",
    "under an old bridge",
    "in a busy city",
)
OBJECTS = (
    "a golden key",
    "a map with no names",
    "a singing stone",
    "a lost kitten",
    "a door in a tree",
    "a shooting star",
)
STORY_TEMPLATES = (
    "Once upon a time, there was a {adj} {character} who lived {place}.",
    "Long ago, {place}, a {adj} {character} found {object}.",
    "One morning, a {adj} {character} named {name} set out to find {object}.",
    "Nobody {place} believed the {adj} {character} until the day {name} discovered {object}.",
)


def story_opening(rng: random.Random) -> Built:
    slots = {
        "adj": rng.choice(ADJECTIVES),
        "character": rng.choice(CHARACTERS),
        "place": rng.choice(PLACES),
        "object": rng.choice(OBJECTS),
        "name": rng.choice(NAMES)[0],
    }
    template = rng.choice(STORY_TEMPLATES)
    text = template.format(**slots)
    used = {k: v for k, v in slots.items() if "{" + k + "}" in template}
    return text[0].upper() + text[1:], None, None, {"template": STORY_TEMPLATES.index(template), **used}


BUILDERS: dict[str, tuple[str, Callable[[random.Random], Built] | tuple[Callable[[random.Random], Built], ...]]] = {
    "arithmetic": ("math", ARITHMETIC),
    "code": ("code", code_completion),
    "factual": ("general", factual_sentence),
    "story": ("stories", story_opening),
}
