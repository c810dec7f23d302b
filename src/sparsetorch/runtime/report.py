"""What `runtime.compile` did: one decision per layer, and a table that groups alike layers."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.decide import DENSE, LayerDecision

__all__ = ["CompileReport"]


@dataclass(frozen=True)
class CompileReport:
    """The decisions of one compile or load, in model order."""

    decisions: tuple[LayerDecision, ...]
    config: RuntimeConfig

    @property
    def replaced(self) -> list[str]:
        """Names of the layers that now run sparse."""
        return [d.name for d in self.decisions if d.chosen != DENSE]

    def summary(self) -> str:
        """One line, e.g. '210 of 210 layers sparse (nm: 210)'."""
        counts: dict[str, int] = defaultdict(int)
        for d in self.decisions:
            counts[d.chosen] += 1
        formats = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        return f"{len(self.replaced)} of {len(self.decisions)} layers sparse ({formats})"

    def table(self) -> str:
        """Markdown: layers grouped by shape, density and choice, with each kind's speedup over dense."""
        groups: dict[tuple, list[LayerDecision]] = defaultdict(list)
        for d in self.decisions:
            groups[(d.shape, round(d.density, 2), d.chosen)].append(d)
        lines = ["| shape (out×in) | density | layers | runs | speedup over dense per batch size (each format) |",
                 "|---|---|---|---|---|"]
        for (shape, density, chosen), members in groups.items():
            first = members[0]
            kinds = [k for k in first.seconds if k != DENSE]
            measured = "; ".join(
                f"{k}: " + ", ".join(f"b{b} {s:.2f}×" for b, s in first.speedup(k).items()) for k in kinds
            ) or first.reason
            lines.append(f"| {shape[0]}×{shape[1]} | {density:.0%} | {len(members)} | {chosen} | {measured} |")
        return "\n".join(lines)
