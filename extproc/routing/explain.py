"""Why a request got its plan: the record ``RoutingTable.resolve`` fills in when asked.

This module owns the explanation's shape and its two renderings: a readable multi-line report for
``python -m extproc explain`` and a compact one-line form for the ``x-gateway-explain`` response
header. It holds no routing logic; ``routing.table`` records what it did here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Explanation:
    """Candidates, filters with reasons, strategy scores, and the resulting plan."""

    virtual_model: str = ""
    strategy: str = ""
    category: str | None = None
    category_reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)
    """(target, reason) for every target removed from first choice, in the order checked."""
    pools: list[tuple[str, list[str]]] = field(default_factory=list)
    """(pool name, eligible targets) in precedence order."""
    scores: dict[str, str] = field(default_factory=dict)
    sticky: str = ""
    plan: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, target: str, reason: str) -> None:
        """Record that ``target`` was filtered out, and why."""
        self.filtered.append((target, reason))

    def render(self) -> str:
        """A readable report, one fact per line."""
        lines = [f"virtual model: {self.virtual_model}", f"strategy:      {self.strategy}"]
        if self.category is not None:
            lines.append(f"category:      {self.category} ({self.category_reason})")
        if self.metadata:
            meta = ", ".join(f"{k}={v}" for k, v in sorted(self.metadata.items()))
            lines.append(f"metadata:      {meta}")
        lines.append("candidates:")
        lines.extend(f"  - {c}" for c in self.candidates)
        lines.append("filters:")
        if self.filtered:
            lines.extend(f"  - {t}: {reason}" for t, reason in self.filtered)
        else:
            lines.append("  (none)")
        lines.append("pools:")
        for name, members in self.pools:
            lines.append(f"  - {name}: {', '.join(members) if members else '(empty)'}")
        lines.append("scores:")
        lines.extend(f"  - {t}: {s}" for t, s in self.scores.items())
        if self.sticky:
            lines.append(f"sticky:        {self.sticky}")
        lines.extend(f"note:          {n}" for n in self.notes)
        if self.plan:
            lines.append(f"primary:       {self.plan[0]}")
            lines.append(f"fallbacks:     {', '.join(self.plan[1:]) or '(none)'}")
        return "\n".join(lines)

    def compact(self) -> str:
        """One header-safe line: ``strategy=...; filtered=...; scores=...; plan=...``."""
        parts = [f"strategy={self.strategy}"]
        if self.category is not None:
            parts.append(f"category={self.category}")
        if self.filtered:
            parts.append("filtered=" + ",".join(f"{t}({r})" for t, r in self.filtered))
        if self.scores:
            parts.append("scores=" + ",".join(f"{t}({s})" for t, s in self.scores.items()))
        if self.sticky:
            parts.append(f"sticky={self.sticky}")
        parts.append("plan=" + ",".join(self.plan))
        text = "; ".join(parts)
        return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:4000]
