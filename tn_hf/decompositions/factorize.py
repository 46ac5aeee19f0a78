"""Balanced factorisation of sizes into tensor modes (512 -> 8x8x8)."""
from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["factorize", "auto_modes"]


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


@lru_cache(maxsize=4096)
def factorize(n: int, d: int) -> tuple[int, ...]:
    """Most even split of ``n`` into ``d`` factors (product == n), sorted ascending.

    "Most even" = least sum of squared log-deviations from ``n ** (1/d)``; factors of 1
    are allowed so any ``n`` works (``factorize(7, 2) == (1, 7)``).
    """
    if not isinstance(n, int) or not isinstance(d, int) or isinstance(n, bool) or isinstance(d, bool):
        raise ValueError(f"factorize(n, d): n and d must be ints, got {n!r}, {d!r}")
    if n < 1 or d < 1:
        raise ValueError(f"factorize(n, d): need n >= 1 and d >= 1, got n={n}, d={d}")
    target = math.log(n) / d
    best: tuple[float, tuple[int, ...]] | None = None

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]):
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                cost = sum((math.log(f) - target) ** 2 for f in cand)
                if best is None or cost < best[0] - 1e-12:
                    best = (cost, cand)
            return
        for f in _divisors(rest):
            if f < lo:
                continue
            if f ** k > rest:  # remaining factors are >= f: product would exceed rest
                break
            rec(rest // f, k - 1, f, acc + (f,))

    rec(n, d, 1, ())
    assert best is not None
    return best[1]


def auto_modes(n: int, min_factor: int = 4, max_modes: int | None = None) -> tuple[int, ...]:
    """Factor ``n`` into as many modes as possible while every factor stays >= ``min_factor``.

    Returns ``(n,)`` when no split qualifies (primes, small sizes). ``max_modes`` caps d.
    """
    if n < 1:
        raise ValueError(f"auto_modes: need n >= 1, got {n}")
    best: tuple[int, ...] = (n,)
    d = 2
    while min_factor ** d <= n and (max_modes is None or d <= max_modes):
        f = factorize(n, d)
        if f[0] >= min_factor:
            best = f
        d += 1
    return best
