"""Shared prefixes within a request: sequences that start with the same tokens (a prompt scored with
y_w and y_l, or with several samples) are forwarded with that prefix computed once.

Pure: it only decides the groups; the engine runs each group's prefix once, keeps its key/value
cache, and runs the members' remaining tokens against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Group = tuple[tuple[int, ...], int]  # (sequence indices, shared prefix length)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_groups(sequences: Sequence[torch.Tensor], min_prefix: int) -> list[Group]:
    """Groups of two or more sequences whose first `p >= min_prefix` tokens are equal.

    Sequences are sorted so that those sharing a prefix are neighbours; a run of neighbours
    becomes one group while the tokens it saves, (members - 1) * p with p the run's common
    prefix, do not shrink by taking in the next one. p stops one token short of the shortest
    member, so every member has tokens of its own. Sequences in no group are not listed.
    """
    if min_prefix < 1 or len(sequences) < 2:
        return []
    tokens = [s.tolist() for s in sequences]
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    groups: list[Group] = []
    members, shared = [order[0]], 0

    def close() -> None:
        if len(members) > 1 and shared >= min_prefix:
            groups.append((tuple(sorted(members)), shared))

    for prev, cur in zip(order, order[1:]):
        common = min(_common_prefix(tokens[prev], tokens[cur]), len(tokens[prev]) - 1, len(tokens[cur]) - 1)
        joined = common if len(members) == 1 else min(shared, common)
        if joined >= min_prefix and len(members) * joined >= (len(members) - 1) * shared:
            members.append(cur)
            shared = joined
        else:
            close()
            members, shared = [cur], 0
    close()
    return groups
