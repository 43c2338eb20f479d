"""Brute-force oracle shared by the FlexSP tests: the best makespan over group structures and every assignment
of sequences to their groups, memory-checked, on tiny instances."""
import itertools

import numpy as np

STRUCTURES = ([4], [2, 2], [2, 1, 1], [1, 1, 1, 1])  # every maximal buddy structure of 4 GPUs; groups may stay empty


def brute_force(lens, cm, structures=STRUCTURES):
    best = np.inf
    n = len(lens)
    for degs in structures:
        for assign in itertools.product(range(len(degs)), repeat=n):
            groups = [[i for i in range(n) if assign[i] == g] for g in range(len(degs))]
            if not all(cm.fits(d, lens[ids]) for d, ids in zip(degs, groups)):
                continue
            best = min(best, max(cm.group_time(d, lens[ids]) for d, ids in zip(degs, groups) if ids))
    return best
