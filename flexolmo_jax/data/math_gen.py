"""A seeded generator of worked math problems with step-by-step solutions.

No maintained offline math corpus installs on current numpy/sympy, so the "math" domain is
generated. Every problem is computed exactly (integers and `fractions.Fraction`), so each solution
is correct by construction, and `generate(n, seed)` is a pure function of its arguments.
"""

from __future__ import annotations

import random
from fractions import Fraction

_NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Farah", "Goran", "Hana", "Ivan", "Jade", "Kofi",
          "Lena", "Mateo", "Nia", "Omar", "Priya")
_ITEMS = (("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("stamp", "stamps"),
          ("pencil", "pencils"), ("ticket", "tickets"), ("card", "cards"), ("shell", "shells"))


def _frac(x: Fraction) -> str:
  return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _arithmetic(rng: random.Random) -> str:
  a, b, c, d = (rng.randint(2, 60) for _ in range(4))
  op = rng.choice(("+", "-"))
  inner = a + b if op == "+" else a - b
  prod = inner * c
  result = prod - d
  return (f"Problem: Compute ({a} {op} {b}) * {c} - {d}.\n\nSolution:\n"
          f"Step 1: Evaluate the parentheses first: {a} {op} {b} = {inner}.\n"
          f"Step 2: Multiply: {inner} * {c} = {prod}.\n"
          f"Step 3: Subtract: {prod} - {d} = {result}.\n"
          f"Answer: {result}")


def _fractions(rng: random.Random) -> str:
  p = Fraction(rng.randint(1, 9), rng.randint(2, 12))
  q = Fraction(rng.randint(1, 9), rng.randint(2, 12))
  denom = p.denominator * q.denominator // _gcd(p.denominator, q.denominator)
  pn, qn = p.numerator * (denom // p.denominator), q.numerator * (denom // q.denominator)
  total = p + q
  return (f"Problem: Add {_frac(p)} + {_frac(q)} and simplify.\n\nSolution:\n"
          f"Step 1: The least common denominator of {p.denominator} and {q.denominator} is {denom}.\n"
          f"Step 2: Rewrite: {_frac(p)} = {pn}/{denom} and {_frac(q)} = {qn}/{denom}.\n"
          f"Step 3: Add the numerators: {pn} + {qn} = {pn + qn}, giving {pn + qn}/{denom}.\n"
          f"Step 4: Simplify: {pn + qn}/{denom} = {_frac(total)}.\n"
          f"Answer: {_frac(total)}")


def _term(coef: int, var: str = "") -> str:
  """A signed term to follow another one: ' + 3x', ' - 8', ' - x'."""
  sign = "-" if coef < 0 else "+"
  mag = abs(coef)
  body = var if (var and mag == 1) else f"{mag}{var}"
  return f" {sign} {body}"


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def _linear(rng: random.Random) -> str:
  x = rng.randint(-20, 20)
  a = rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
  b = rng.randint(-50, 50)
  c = a * x + b
  return (f"Problem: Solve for x: {a}x{_term(b)} = {c}.\n\nSolution:\n"
          f"Step 1: Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}.\n"
          f"Step 2: Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
          f"Step 3: Check: {a} * {x} + {b} = {a * x + b}, which equals {c}.\n"
          f"Answer: x = {x}")


def _quadratic(rng: random.Random) -> str:
  r1, r2 = rng.randint(-12, 12), rng.randint(-12, 12)
  b, c = -(r1 + r2), r1 * r2
  lo, hi = sorted((r1, r2))
  equation = "x^2" + (_term(b, "x") if b else "") + (_term(c) if c else "")
  return (f"Problem: Solve {equation} = 0.\n\nSolution:\n"
          f"Step 1: Look for two numbers whose product is {c} and whose sum is {-b}: "
          f"they are {r1} and {r2}.\n"
          f"Step 2: Factor: (x - {r1})(x - {r2}) = 0.\n"
          f"Step 3: Set each factor to zero: x = {r1} or x = {r2}.\n"
          f"Answer: x = {lo}" + ("" if lo == hi else f" or x = {hi}"))


def _system(rng: random.Random) -> str:
  x, y = rng.randint(-10, 10), rng.randint(-10, 10)
  a1, b1, a2, b2 = (rng.randint(1, 7) for _ in range(4))
  while a1 * b2 - a2 * b1 == 0:
    b2 += 1
  c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
  det = a1 * b2 - a2 * b1
  return (f"Problem: Solve the system {a1}x + {b1}y = {c1} and {a2}x + {b2}y = {c2}.\n\nSolution:\n"
          f"Step 1: Multiply the first equation by {b2} and the second by {b1}: "
          f"{a1 * b2}x + {b1 * b2}y = {c1 * b2} and {a2 * b1}x + {b1 * b2}y = {c2 * b1}.\n"
          f"Step 2: Subtract to eliminate y: {det}x = {c1 * b2 - c2 * b1}, so x = {x}.\n"
          f"Step 3: Substitute into the first equation: {b1}y = {c1} - {a1 * x} = {c1 - a1 * x}, "
          f"so y = {y}.\n"
          f"Answer: x = {x}, y = {y}")


def _word_share(rng: random.Random) -> str:
  name, other = rng.sample(_NAMES, 2)
  item, items = rng.choice(_ITEMS)
  per_box, boxes = rng.randint(3, 15), rng.randint(2, 9)
  given = rng.randint(1, per_box * boxes - 1)
  total = per_box * boxes
  left = total - given
  return (f"Problem: {name} buys {boxes} boxes of {items} with {per_box} {items} in each box, "
          f"then gives {given} {items if given != 1 else item} to {other}. "
          f"How many {items} does {name} have left?\n\nSolution:\n"
          f"Step 1: Total {items}: {boxes} * {per_box} = {total}.\n"
          f"Step 2: After giving {given} away: {total} - {given} = {left}.\n"
          f"Answer: {left}")


def _word_rate(rng: random.Random) -> str:
  name = rng.choice(_NAMES)
  speed, hours, extra = rng.randint(20, 90), rng.randint(2, 6), rng.randint(10, 120)
  minutes = rng.choice((15, 30, 45))
  dist1 = speed * hours
  dist2 = Fraction(speed * minutes, 60)
  total = dist1 + dist2 + extra
  return (f"Problem: {name} drives at {speed} km/h for {hours} hours, then for another {minutes} "
          f"minutes at the same speed, and then takes a train for {extra} km. "
          f"How far does {name} travel in total?\n\nSolution:\n"
          f"Step 1: Distance in the first {hours} hours: {speed} * {hours} = {dist1} km.\n"
          f"Step 2: {minutes} minutes is {_frac(Fraction(minutes, 60))} of an hour, so "
          f"{speed} * {_frac(Fraction(minutes, 60))} = {_frac(dist2)} km.\n"
          f"Step 3: Add the train ride: {dist1} + {_frac(dist2)} + {extra} = {_frac(total)} km.\n"
          f"Answer: {_frac(total)} km")


def _word_percent(rng: random.Random) -> str:
  price = rng.randint(10, 400)
  pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
  discount = Fraction(price * pct, 100)
  final = price - discount
  return (f"Problem: A jacket costs ${price}. It is on sale for {pct}% off. "
          f"What is the sale price?\n\nSolution:\n"
          f"Step 1: The discount is {pct}% of {price}: {price} * {pct}/100 = {_frac(discount)}.\n"
          f"Step 2: Subtract it from the price: {price} - {_frac(discount)} = {_frac(final)}.\n"
          f"Answer: ${float(final):.2f}")


_KINDS = (_arithmetic, _fractions, _linear, _quadratic, _system, _word_share, _word_rate,
          _word_percent)


def generate(n: int, seed: int = 0) -> list[str]:
  """Returns n worked problems (arithmetic, fractions, algebra, word problems), seeded."""
  rng = random.Random(seed)
  return [rng.choice(_KINDS)(rng) for _ in range(n)]
