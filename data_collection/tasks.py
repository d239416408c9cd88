"""The built-in task generator: seeded, deterministic arithmetic and short word problems.

The embedded default model (SmolLM2-135M-Instruct) is weak, so the tasks are small:
each *family* has *levels* 1 (easiest) to 3 that set the size of the numbers. The default
mix (:data:`DEFAULT_FAMILIES` x :data:`DEFAULT_LEVELS`) is tuned so that the default model
gets roughly 20-60% of its samples right (measured rates: ``docs/collect.md``).

So that a probe trained on these problems cannot key on one template's wording, every
family is written in several phrasings (drawn at random per problem), word problems draw
names, items and containers from lists, and a share of word problems carry a *distractor*
sentence with a number that plays no part in the answer. Two families are multi-step word
problems (``word_add3``, ``word_two_step``); the default model almost never solves them, so
they are not in the default mix.

Problem ids are ``builtin-s<seed>-<index>``; the same ``(n, seed, families, levels)``
always gives the same problems. ``meta`` holds ``family``, ``level``, ``operands``,
``template`` (the phrasing's index), ``distractor`` (bool) and ``expression``: the
arithmetic the question asks for, over its operands (``"3 + 4 * 2"``), which the tests
evaluate independently of the wording.

A second, separately written problem set for *testing only* lives in
:mod:`stepprobe.data_collection.ood_tasks` (``builtin-ood:``): other templates, other
vocabulary, never trained on.

Families:

================  =====================================================================
``add``            "What is 7 + 5?", "Add 7 and 5.", "Find the sum of 7 and 5.", ...
                   (L1 one-digit, L2 two+one digit, L3 two+two)
``sub``            "What is 12 - 5?", "Subtract 5 from 12.", ... (non-negative results)
``mul``            "What is 3 * 4?", "Multiply 3 by 4.", "What is 3 times 4?", ...
                   (L1 2..9 x 2..9, L2 11..30 x 2..9, L3 11..99 x 11..30)
``chain``          "What is 3 + 4 + 2?" (L1 three one-digit terms, L2 with a minus, L3 four)
``word_add``       "Tom has 3 apples. He gets 4 more apples. How many apples ...?" (5 phrasings)
``word_sub``       "Anna has 9 pens. She gives 4 pens to a friend. How many ... left?"
``word_mul``       "There are 3 boxes. Each box has 4 cookies. How many ...?" (5 phrasings)
                   (L1 2..5 x 2..5, L2 2..9 x 2..9, L3 11..20 x 3..9)
``word_add3``      three additions in a row: "Sam has 2 cards. He finds 3 more. Then he
                   gets 1 more. ..." (L1 2..5 each)
``word_two_step``  a product, then a sum: "Mia has 2 bags with 3 marbles in each, and 4
                   more marbles. ..." (L1 2..4 x 2..4 + 2..5)
================  =====================================================================
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..errors import StepprobeError
from .problems import Problem

DEFAULT_N = 300
# The default model cannot subtract (sub, word_sub and chain: 0-6% of samples right in the
# tuning runs), nor solve the multi-step word problems (word_add3 1/80, word_two_step 2/80
# samples right, 2026-11-29, 64 problems x 8 traces), so the default mix leaves them out;
# they remain available as harder families (for stronger models).
DEFAULT_FAMILIES = ("add", "mul", "word_add", "word_mul")
DEFAULT_LEVELS = (1,)
# Share of word problems that get one distractor sentence (a number that is not used).
DISTRACTOR_RATE = 0.35

_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora", "Omar",
          "Ella", "Ravi", "Ivy", "Hugo", "Lena")
_HE = {"Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Omar", "Ravi", "Hugo"}
_ITEMS = ("apples", "pens", "marbles", "books", "stickers", "cookies", "cards", "balloons", "shells", "toys",
          "pencils", "stamps", "oranges", "buttons", "coins", "beads")
_CONTAINERS = {"boxes": "box", "bags": "bag", "baskets": "basket", "jars": "jar", "shelves": "shelf",
               "plates": "plate", "packs": "pack", "cups": "cup"}

Generated = tuple[str, int, dict]


def _size(rng: random.Random, level: int, which: int) -> int:
    """Operand ``which`` (0 or 1) of an add/sub problem at ``level``."""
    if level == 1:
        return rng.randint(1, 9)
    if level == 2:
        return rng.randint(10, 99) if which == 0 else rng.randint(1, 9)
    return rng.randint(10, 99)


def _pick(rng: random.Random, templates: Sequence[str], **values) -> tuple[str, int]:
    k = rng.randrange(len(templates))
    return templates[k].format(**values), k


def _meta(operands: list[int], expression: str, template: int, distractor: bool = False) -> dict:
    return {"operands": operands, "expression": expression, "template": template, "distractor": distractor}


_ADD_T = ("What is {a} + {b}?", "Add {a} and {b}.", "Find the sum of {a} and {b}.", "Calculate {a} plus {b}.",
          "What do you get if you add {b} to {a}?", "Compute {a} + {b}.")
_SUB_T = ("What is {a} - {b}?", "Subtract {b} from {a}.", "Calculate {a} minus {b}.",
          "What is the difference between {a} and {b}?", "Compute {a} - {b}.")
_MUL_T = ("What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?",
          "Find the product of {a} and {b}.", "Compute {a} * {b}.", "Calculate {a} multiplied by {b}.")


def _add(rng: random.Random, level: int) -> Generated:
    a, b = _size(rng, level, 0), _size(rng, level, 1)
    q, k = _pick(rng, _ADD_T, a=a, b=b)
    return q, a + b, _meta([a, b], f"{a} + {b}", k)


def _sub(rng: random.Random, level: int) -> Generated:
    a, b = _size(rng, level, 0), _size(rng, level, 1)
    if level == 1:
        a, b = a + b, b  # one-digit subtrahend, result one digit: 12 - 5
    elif b > a:
        a, b = b, a
    q, k = _pick(rng, _SUB_T, a=a, b=b)
    return q, a - b, _meta([a, b], f"{a} - {b}", k)


def _mul(rng: random.Random, level: int) -> Generated:
    if level == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    elif level == 2:
        a, b = rng.randint(11, 30), rng.randint(2, 9)
    else:
        a, b = rng.randint(11, 99), rng.randint(11, 30)
    q, k = _pick(rng, _MUL_T, a=a, b=b)
    return q, a * b, _meta([a, b], f"{a} * {b}", k)


def _chain(rng: random.Random, level: int) -> Generated:
    if level == 1:
        xs = [rng.randint(1, 9) for _ in range(3)]
        expr = " + ".join(map(str, xs))
    elif level == 2:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        xs = [a, b, rng.randint(1, a + b)]
        expr = f"{xs[0]} + {xs[1]} - {xs[2]}"
    else:
        xs = [rng.randint(1, 20) for _ in range(4)]
        expr = " + ".join(map(str, xs))
    q, k = _pick(rng, ("What is {e}?", "Compute {e}.", "Calculate the value of {e}."), e=expr)
    return q, eval(expr), _meta(xs, expr, k)  # noqa: S307  (digits, + and - built above)


def _word_numbers(rng: random.Random, level: int) -> tuple[int, int]:
    if level == 1:
        return rng.randint(2, 9), rng.randint(2, 9)
    if level == 2:
        return rng.randint(10, 30), rng.randint(2, 9)
    return rng.randint(20, 90), rng.randint(11, 40)


def _who(rng: random.Random) -> dict[str, str]:
    name = rng.choice(_NAMES)
    he = name in _HE
    return {"name": name, "Pron": "He" if he else "She", "pron": "he" if he else "she", "pos": "his" if he else "her"}


def _item(rng: random.Random, avoid: str | None = None) -> str:
    return rng.choice([i for i in _ITEMS if i != avoid])


def _distract(rng: random.Random, who: dict[str, str], item: str) -> str:
    """A sentence with a number that the answer does not use (empty for most problems)."""
    if rng.random() >= DISTRACTOR_RATE:
        return ""
    other = _item(rng, avoid=item)
    n = rng.randint(2, 12)
    return rng.choice((f" {who['Pron']} also has {n} {other}.", f" {who['name']} is {n + 5} years old.",
                       f" {who['Pron']} keeps {n} {other} in a drawer.",
                       f" {who['pos'].capitalize()} friend has {n} {other}."))


_WORD_ADD_T = (
    "{name} has {a} {item}.{d} {Pron} gets {b} more {item}. How many {item} does {name} have now?",
    "{name} had {a} {item}. Then {pron} bought {b} more.{d} How many {item} does {name} have in total?",
    "{name} collected {a} {item} on Monday and {b} {item} on Tuesday.{d} How many {item} did {pron} collect "
    "altogether?",
    "There are {a} {item} on a table.{d} {name} puts {b} more {item} on the table. How many {item} are on the "
    "table now?",
    "{name} found {a} {item} and {pos} sister found {b} {item}.{d} How many {item} did they find together?",
)
_WORD_SUB_T = (
    "{name} has {a} {item}. {Pron} gives {b} {item} to a friend.{d} How many {item} does {name} have left?",
    "{name} had {a} {item}.{d} {Pron} lost {b} of them. How many {item} does {pron} have now?",
    "There were {a} {item} in a bowl. {name} took {b} {item}.{d} How many {item} are still in the bowl?",
)
_WORD_MUL_T = (
    "There are {a} {box}. Each {one} has {b} {item}.{d} How many {item} are there in all?",
    "{name} has {a} {box} with {b} {item} in each {one}.{d} How many {item} does {name} have?",
    "{name} buys {a} {box} of {item}. Every {one} holds {b} {item}.{d} How many {item} did {pron} buy?",
    "A shop puts {b} {item} in each {one}.{d} How many {item} are in {a} {box}?",
    "{name} fills {a} {box}, putting {b} {item} in each one.{d} How many {item} did {pron} use?",
)
_WORD_ADD3_T = (
    "{name} has {a} {item}. {Pron} finds {b} more.{d} Then a friend gives {pos} {c} more. How many {item} does "
    "{name} have now?",
    "On Monday {name} got {a} {item}, on Tuesday {b} {item} and on Wednesday {c} {item}.{d} How many {item} "
    "did {pron} get in the three days?",
    "A box has {a} red {item}, {b} blue {item} and {c} green {item}.{d} How many {item} are in the box?",
    "{name} picked {a} {item}. Later {pron} picked {b} more, and after lunch {c} more.{d} How many {item} did "
    "{pron} pick in all?",
)
_WORD_TWO_STEP_T = (
    "{name} has {a} {box} with {b} {item} in each {one}, and {c} more {item} on the desk.{d} How many {item} "
    "does {name} have in all?",
    "There are {a} {box}. Each {one} holds {b} {item}. {name} adds {c} loose {item}.{d} How many {item} are "
    "there now?",
    "{name} buys {a} {box} of {item} with {b} in every {one}.{d} {Pron} already had {c} {item}. How many "
    "{item} does {pron} have now?",
)


def _word(rng: random.Random, templates: Sequence[str], values: dict) -> tuple[str, int, bool]:
    who = _who(rng)
    item = _item(rng)
    box = rng.choice(list(_CONTAINERS))
    d = _distract(rng, who, item)
    q, k = _pick(rng, templates, **who, item=item, box=box, one=_CONTAINERS[box], d=d, **values)
    return q, k, bool(d)


def _word_add(rng: random.Random, level: int) -> Generated:
    a, b = _word_numbers(rng, level)
    q, k, d = _word(rng, _WORD_ADD_T, {"a": a, "b": b})
    return q, a + b, _meta([a, b], f"{a} + {b}", k, d)


def _word_sub(rng: random.Random, level: int) -> Generated:
    a, b = _word_numbers(rng, level)
    if level == 1:
        a = a + b
    elif b > a:
        a, b = b, a
    q, k, d = _word(rng, _WORD_SUB_T, {"a": a, "b": b})
    return q, a - b, _meta([a, b], f"{a} - {b}", k, d)


def _word_mul(rng: random.Random, level: int) -> Generated:
    if level == 1:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
    elif level == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(11, 20), rng.randint(3, 9)
    q, k, d = _word(rng, _WORD_MUL_T, {"a": a, "b": b})
    return q, a * b, _meta([a, b], f"{a} * {b}", k, d)


def _word_add3(rng: random.Random, level: int) -> Generated:
    hi = (5, 9, 30)[level - 1]
    a, b, c = (rng.randint(2, hi) for _ in range(3))
    q, k, d = _word(rng, _WORD_ADD3_T, {"a": a, "b": b, "c": c})
    return q, a + b + c, _meta([a, b, c], f"{a} + {b} + {c}", k, d)


def _word_two_step(rng: random.Random, level: int) -> Generated:
    hi_a, hi_b, hi_c = ((4, 4, 5), (6, 9, 9), (12, 9, 30))[level - 1]
    a, b, c = rng.randint(2, hi_a), rng.randint(2, hi_b), rng.randint(2, hi_c)
    q, k, d = _word(rng, _WORD_TWO_STEP_T, {"a": a, "b": b, "c": c})
    return q, a * b + c, _meta([a, b, c], f"{a} * {b} + {c}", k, d)


FAMILIES: dict[str, Callable[[random.Random, int], Generated]] = {
    "add": _add, "sub": _sub, "mul": _mul, "chain": _chain,
    "word_add": _word_add, "word_sub": _word_sub, "word_mul": _word_mul,
    "word_add3": _word_add3, "word_two_step": _word_two_step,
}
LEVELS = (1, 2, 3)



def generate_tasks(n: int = DEFAULT_N, seed: int = 0, *, families: Sequence[str] | None = None,
                   levels: Sequence[int] | None = None) -> list[Problem]:
    """``n`` problems cycling through ``families`` x ``levels``; deterministic in all arguments.

    Questions do not repeat within one call while the family/level has unused questions left.
    """
    families = list(families or DEFAULT_FAMILIES)
    levels = list(levels or DEFAULT_LEVELS)
    if n < 1:
        raise StepprobeError(f"built-in tasks: n must be at least 1, got {n}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise StepprobeError(f"built-in tasks: unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise StepprobeError(f"built-in tasks: levels must be among {LEVELS}, got {bad}")
    combos = [(f, lv) for lv in levels for f in families]
    rng = random.Random(f"stepprobe-builtin-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for i in range(n):
        family, level = combos[i % len(combos)]
        for _ in range(50):  # avoid repeats; small families may run out, then a repeat is allowed
            question, answer, meta = FAMILIES[family](rng, level)
            if question not in seen:
                break
        seen.add(question)
        out.append(Problem(problem_id=f"builtin-s{seed}-{i:05d}", question=question, gold=str(answer),
                           meta={"family": family, "level": level, **meta}))
    return out
