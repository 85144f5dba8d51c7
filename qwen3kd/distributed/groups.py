"""Process groups of a layout that is not megatron's global one: the teacher's.

megatron-core 0.16 builds a model on explicit groups (`GPTModel(..., pg_collection=...)`) and runs
its schedules on them (`pg_collection=`, `p2p_communicator=`), but has no helper that builds a
`ProcessGroupCollection` for a second layout. This module does, with megatron's rank order: the
dense grid is tp-cp-dp-pp (tensor ranks adjacent, pipeline stages outermost), the expert grid
etp-ep-edp-pp, as `initialize_model_parallel` lays them out. A group whose members are exactly
those of one of the student's groups is that group (no second communicator for the same ranks).

Every rank creates every group, in the same order (torch.distributed.new_group's contract): the
partitions are computed from the layout alone, identically everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

DENSE = ("tp", "cp", "dp", "pp")
EXPERT = ("etp", "ep", "edp", "pp")
# ProcessGroupCollection field → (grid, the dimensions its groups span).
SPANS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "tp": (DENSE, frozenset({"tp"})),
    "cp": (DENSE, frozenset({"cp"})),
    "dp": (DENSE, frozenset({"dp"})),
    "pp": (DENSE, frozenset({"pp"})),
    "dp_cp": (DENSE, frozenset({"dp", "cp"})),
    "tp_cp": (DENSE, frozenset({"tp", "cp"})),
    "mp": (DENSE, frozenset({"tp", "pp"})),
    "tp_dp_cp": (DENSE, frozenset({"tp", "dp", "cp"})),
    "ep": (EXPERT, frozenset({"ep"})),
    "expt_tp": (EXPERT, frozenset({"etp"})),
    "tp_ep": (EXPERT, frozenset({"etp", "ep"})),
    "tp_ep_pp": (EXPERT, frozenset({"etp", "ep", "pp"})),
    "expt_dp": (EXPERT, frozenset({"edp"})),
}
# Fields that are another field's groups here (no partial data parallelism).
ALIASES = {"intra_dp_cp": "dp_cp", "intra_expt_dp": "expt_dp"}
Partition = tuple[tuple[int, ...], ...]


def partition(sizes: dict[str, int], grid: tuple[str, ...], span: frozenset[str]) -> Partition:
    """The ranks grouped by their coordinates outside `span` (first dimension varies fastest)."""
    dims = [sizes[d] for d in grid]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(math.prod(dims)):
        coords, r = [], rank
        for n in dims:
            coords.append(r % n)
            r //= n
        key = tuple(c for d, c in zip(grid, coords, strict=True) if d not in span)
        groups.setdefault(key, []).append(rank)
    return tuple(sorted(tuple(g) for g in groups.values()))


def partitions(layout) -> dict[str, Partition]:
    """Every group of `layout` (a ParallelLayout), as a partition of the ranks per field."""
    sizes = {"tp": layout.tp, "cp": 1, "dp": layout.dp, "pp": layout.pp, "etp": layout.etp,
             "ep": layout.ep, "edp": layout.edp}
    out = {name: partition(sizes, grid, span) for name, (grid, span) in SPANS.items()}
    # Embedding groups (tied embeddings, position embeddings): first and last pipeline stage.
    out["embd"] = tuple(sorted({tuple(sorted({g[0], g[-1]})) for g in out["pp"]}))
    out["pos_embd"] = tuple(sorted({(g[0],) for g in out["pp"]}))
    return out


@dataclass
class Groups:
    """One layout's process groups on this rank: `pgc` for megatron, `exchange` (every rank) for
    the teacher's token and hidden-state all-to-alls."""

    pgc: object  # megatron.core.process_groups_config.ProcessGroupCollection
    exchange: dist.ProcessGroup
    created: int  # new communicators (the others were the student's)

    def all(self) -> set:
        from dataclasses import fields

        return {getattr(self.pgc, f.name) for f in fields(self.pgc) if hasattr(self.pgc, f.name)} | {
            self.exchange}


def build_groups(layout, student_pgc) -> Groups:
    """`layout`'s groups, reusing `student_pgc`'s where the members are the same. Collective: every
    rank calls it at set-up, after megatron's (the student's) groups exist."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    # A rank outside every group of a field (the embedding groups off the first and last
    # stages) holds None there, as in megatron's own collection.
    groups = {name: getattr(student_pgc, name) for name in (*SPANS, "embd", "pos_embd")}
    mine = {name: tuple(dist.get_process_group_ranks(g)) if g is not None else None
            for name, g in groups.items()}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)  # the student's partitions, as megatron made them
    student = {tuple(sorted({e[name] for e in every if e[name] is not None})): g
               for name, g in groups.items()}
    rank, made, created = dist.get_rank(), {}, 0
    for name, parts in partitions(layout).items():
        made[name] = None
        if parts in student:
            made[name] = student[parts]
            continue
        for ranks in parts:
            g = dist.new_group(list(ranks))
            created += 1
            if rank in ranks:
                made[name] = g
    made.update({alias: made[name] for alias, name in ALIASES.items()})
    exchange = dist.new_group(list(range(dist.get_world_size())))
    return Groups(pgc=ProcessGroupCollection(**made), exchange=exchange, created=created + 1)
