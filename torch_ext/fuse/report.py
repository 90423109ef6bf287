"""The report: each pair fused, each nn.Linear left alone and why, the forwards rewritten."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FusedPair:
    """One fused pair: the ``nn.Linear`` at ``linear`` and its ``activation``, called from the
    forward of ``caller``; ``how``: what changed besides the Linear."""

    linear: str
    activation: str
    caller: str
    how: str


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``fused`` pairs, each ``nn.Linear`` ``left_alone`` with the reason,
    the modules whose ``forward`` was ``rewritten`` (and the runs of layers those call as one
    ``fused_chain``: ``chains``), and the modules found ``untraceable`` with the error. ``str(report)`` is a readable table."""

    fused: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)  # (path, reason)
    rewritten: list = field(default_factory=list)
    untraceable: dict = field(default_factory=dict)  # path -> error
    chains: list = field(default_factory=list)  # runs of layers a rewritten forward calls as one fused_chain

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} Linear+activation pair(s)"
                 + (f", left {len(self.left_alone)} nn.Linear alone" if self.left_alone else "")]
        lines += [f"  fused   {p.linear} + {p.activation}  (in {p.caller}.forward; {p.how})" for p in self.fused]
        lines += [f"  left    {path}: {reason}" for path, reason in self.left_alone]
        lines += [f"  forward rewritten: {path}" for path in self.rewritten]
        lines += [f"  chained: {' -> '.join(run)} (one fused_chain call)" for run in self.chains]
        lines += [f"  untraceable: {path}: {why}" for path, why in self.untraceable.items()]
        return "\n".join(lines)


def _path(name: str) -> str:
    return name or "(model)"
