"""Scrambled Halton points: the quasi-random sequence used for hyperparameter search.

Dimension d is a Van der Corput sequence in the d-th prime base (2, 3, 5, 7, ...): point n has
coordinate sum_k sigma_{d,k}(a_k) * b^-(k+1), where a_k are the base-b digits of n + HALTON_SKIP
and sigma_{d,k} is a random permutation of {0, ..., b-1} for that dimension and digit position
(random digit scrambling). Every point is a pure function of (index, dimension, seed): it needs
no earlier points, so a search can resume at any trial, and the same trial gets the same point
in any process.

Properties kept by the scrambling: in dimension d, any b^m consecutive points put exactly one
point in each interval [j b^-m, (j+1) b^-m) (a bijection on each digit keeps the strata), and
any 2 * 3 consecutive points meet each cell of the 2 x 3 grid of the first two dimensions once.

Why one permutation per digit position, not one per dimension: studies seeded differently must
be tuned on independent points. With a single permutation per dimension, base 2 has only two
permutations, so dimension 0 of every seed is one of two sequences (trial 0 always sits at
u = 0.5 or just below it), and base 3 has six: most seeds share most coordinates. With a
permutation per position, every digit of every coordinate is scrambled independently and
trial i's coordinate is uniform on [0, 1) across seeds (Owen 1995; Matousek 1998).

Choices stated here because they decide every trial's hyperparameters:
  - HALTON_SKIP = 1: index 0 (all digits zero) is skipped. Under a single permutation per
    dimension it sat at sigma(0) / (b - 1), a corner of the cube (the edge of every search
    range); per-position scrambling moves it inside, but skipping it keeps the unscrambled
    sequence's usual start and costs nothing.
  - sigma permutes all digits, 0 included, over a fixed number of digits (enough for double
    precision), so base 2 is scrambled too (unlike permutations that fix 0).
  - The permutations of dimension d come from numpy's PCG64 seeded by
    SeedSequence([_DOMAIN, seed, d]), shuffled by our own Fisher-Yates on raw 64-bit outputs,
    one permutation per digit position in order: PCG64 and SeedSequence streams are stable
    across numpy versions, Generator methods such as `permutation` are not (NEP 19), and a
    study resumed after an upgrade must get the same points. Adding a dimension never changes
    the earlier ones.

References:
  Bousquet et al. 2017, "Critical Hyper-Parameters: No Random, No Cry" (scrambled Halton
  sequences for hyperparameter search).
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2 and Appendix D (all
  tuning by quasi-random search).
"""

from __future__ import annotations

import functools
import math

import numpy as np

HALTON_SKIP = 1
MAX_DIMENSION = 100
# Separates the Halton permutation stream from other uses of the same user seed.
_DOMAIN = 0x4841_4C54  # "HALT"
_U_MAX = math.nextafter(1.0, 0.0)


@functools.cache
def primes(count: int) -> tuple[int, ...]:
    """The first `count` primes, starting at 2.

    Args:
      count: how many primes, >= 0.
    """
    found: list[int] = []
    candidate = 2
    while len(found) < count:
        if all(candidate % p for p in found if p * p <= candidate):
            found.append(candidate)
        candidate += 1
    return tuple(found)


def _digits_needed(base: int) -> int:
    # Enough base-b digits to resolve 2**-53, the spacing of doubles just below 1.
    return math.ceil(53 * math.log(2) / math.log(base))


@functools.cache
def digit_permutations(seed: int, dimension: int) -> tuple[tuple[int, ...], ...]:
    """The digit scrambling permutations of one dimension, one per digit position.

    Args:
      seed: the search seed (non-negative int).
      dimension: the 0-based dimension; its base is primes(dimension + 1)[-1].
    """
    base = primes(dimension + 1)[-1]
    sequence = np.random.SeedSequence([_DOMAIN, seed, dimension])
    generator = np.random.Generator(np.random.PCG64(sequence))
    positions = _digits_needed(base)
    raw = generator.bit_generator.random_raw(base * positions).reshape(positions, base)
    permutations = []
    for row in raw:
        permutation = list(range(base))
        for j in range(base - 1, 0, -1):
            # Modulo bias is below 2**-53 for bases this small; it cannot change a shuffle's
            # fairness in any measurable way.
            k = int(row[j]) % (j + 1)
            permutation[j], permutation[k] = permutation[k], permutation[j]
        permutations.append(tuple(permutation))
    return tuple(permutations)


def radical_inverse(n: int, base: int, permutations: tuple[tuple[int, ...], ...]) -> float:
    """The scrambled Van der Corput value of integer n in the given base, in [0, 1).

    Args:
      n: a non-negative integer.
      base: a prime.
      permutations: permutations[k] is applied to digit k (the coefficient of base**-(k+1)),
        the leading zeros up to full precision included.
    """
    digits = []
    for position in range(_digits_needed(base)):
        n, digit = divmod(n, base)
        digits.append(permutations[position][digit])
    numerator = 0
    for digit in digits:
        numerator = numerator * base + digit
    # Digit a_k lands at b**-(k+1); integer / integer is correctly rounded to a double.
    value: float = numerator / base ** _digits_needed(base)
    return min(value, _U_MAX)


def _check(index: int, dimension: int, seed: int, skip: int) -> None:
    for name, value in (("index", index), ("dimension", dimension), ("seed", seed),
                        ("skip", skip)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if dimension > MAX_DIMENSION:
        raise ValueError(f"dimension must be <= {MAX_DIMENSION}, got {dimension}")


def halton_point(index: int, dimension: int, seed: int, *,
                 skip: int = HALTON_SKIP) -> tuple[float, ...]:
    """Point `index` of the scrambled Halton sequence of (dimension, seed).

    Args:
      index: the 0-based point (the trial index).
      dimension: the number of coordinates.
      seed: the search seed.
      skip: how many leading points of the sequence are skipped (HALTON_SKIP).

    Example:
      >>> halton_point(3, 2, seed=0) == halton_point(3, 2, seed=0)
      True

    References:
      Bousquet et al. 2017.
    """
    _check(index, dimension, seed, skip)
    n = int(index) + int(skip)
    return tuple(
        radical_inverse(n, base, digit_permutations(int(seed), d))
        for d, base in enumerate(primes(dimension))
    )


def halton_points(start: int, stop: int, dimension: int, seed: int, *,
                  skip: int = HALTON_SKIP) -> np.ndarray:
    """Points start, ..., stop - 1 as a float64 array of shape (stop - start, dimension).

    Args:
      start: the first point index.
      stop: one past the last point index.
      dimension: the number of coordinates.
      seed: the search seed.
      skip: how many leading points of the sequence are skipped (HALTON_SKIP).
    """
    _check(start, dimension, seed, skip)
    if stop < start:
        raise ValueError(f"stop must be >= start, got {start}..{stop}")
    points = np.empty((stop - start, dimension), dtype=np.float64)
    for row, index in enumerate(range(start, stop)):
        points[row] = halton_point(index, dimension, seed, skip=skip)
    return points
