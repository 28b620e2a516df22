"""The pulmonary trees: asymmetric dichotomous branching from the hila inside each lung."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from covidct.synth.anatomy import Grid


@dataclass
class Tree:
    p0: list = field(default_factory=list)
    p1: list = field(default_factory=list)
    r: list = field(default_factory=list)
    gen: list = field(default_factory=list)
    side: list = field(default_factory=list)
    terminal: list = field(default_factory=list)

    def arrays(self):
        return (np.array(self.p0, float).reshape(-1, 3), np.array(self.p1, float).reshape(-1, 3),
                np.array(self.r, float), np.array(self.gen, int), np.array(self.side, int),
                np.array(self.terminal, bool))


def _side_at(side_vol: np.ndarray, grid: Grid, p) -> int:
    c = (grid.n - 1) / 2.0
    k = int(round(p[0] / grid.dz))
    j = int(round(p[1] / grid.px + c))
    i = int(round(p[2] / grid.px + c))
    if 0 <= k < grid.nz and 0 <= j < grid.n and 0 <= i < grid.n:
        return int(side_vol[k, j, i])
    return 0


def perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(size=3)
    w -= w.dot(d) * d
    n = np.linalg.norm(w)
    return w / n if n > 1e-9 else np.array([0.0, 1.0, 0.0])


def grow_tree(rng: np.random.Generator, side_vol: np.ndarray, grid: Grid, side: int,
              roots: list[tuple[np.ndarray, np.ndarray, float]], *, r_min: float = 0.6,
              max_gen: int = 14, tree: Tree | None = None) -> Tree:
    """Grow asymmetric dichotomous trees from ``roots`` (start zyx mm, direction, radius) inside
    one lung: a major child continues nearly straight with most of the calibre, a minor child
    leaves at a wide angle; a branch that would leave the lung is shortened or turned, then
    dropped."""
    tree = tree or Tree()
    stack = [(np.asarray(p, float), np.asarray(d, float) / np.linalg.norm(d), float(r), 0)
             for p, d, r in roots]
    while stack:
        p, d, r, g = stack.pop()
        length = float(np.clip(r * rng.uniform(5.0, 9.0), 4.0, 40.0))
        end = None
        for attempt in range(4):
            cand = p + d * length
            if (
                _side_at(side_vol, grid, cand) == side
                and _side_at(side_vol, grid, p + d * length * 0.5) == side
            ):
                end = cand
                break
            if attempt == 1:   # turn away by a random angle and try again
                nd = d + 0.9 * perpendicular(d, rng)
                d = nd / np.linalg.norm(nd)
            length *= 0.6
        if end is None:
            if tree.terminal and np.array_equal(tree.p1[-1], p):
                tree.terminal[-1] = True
            continue
        last = r * 0.75 < r_min or g + 1 >= max_gen
        tree.p0.append(p)
        tree.p1.append(end)
        tree.r.append(r)
        tree.gen.append(g)
        tree.side.append(side)
        tree.terminal.append(last)
        if last:
            continue
        perp = perpendicular(d, rng)
        major = math.radians(rng.uniform(8, 24))
        minor = math.radians(rng.uniform(35, 65))
        for ang, ratio, sgn in (
            (major, rng.uniform(0.84, 0.92), 1.0),
            (minor, rng.uniform(0.55, 0.72), -1.0),
        ):
            nd = math.cos(ang) * d + math.sin(ang) * sgn * perp
            nd /= np.linalg.norm(nd)
            stack.append((end, nd, r * ratio, g + 1))
    return tree
