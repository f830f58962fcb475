"""One measured figure: two quantities from the same run, their ratio, and its target.

Every benchmark returns ``Figure`` objects, so that each prints the same one-line summary
and all of them end up in one markdown table.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Quantity:
    """A measured value with what it is and its unit."""

    label: str
    value: float
    unit: str

    def __str__(self) -> str:
        return f"{self.label} {_number(self.value)} {self.unit}"


@dataclass(frozen=True)
class Figure:
    """Quantity ``a`` against quantity ``b``; ``ratio`` is a / b.

    ``holds`` is None where the issue sets no target for the figure.
    """

    key: str
    title: str
    a: Quantity
    b: Quantity
    target: str = "-"
    holds: bool | None = None
    details: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.a.value / self.b.value if self.b.value else float("inf")

    def line(self) -> str:
        verdict = "" if self.holds is None else (" (holds)" if self.holds else " (misses)")
        target = "" if self.target == "-" else f"; target {self.target}{verdict}"
        return (
            f"[{self.key}] {self.title}: {self.a} vs {self.b}: ratio {_number(self.ratio)}{target}"
        )


def _number(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_table(figures: list[Figure]) -> str:
    """All figures as a markdown table, one row each, in the order they were measured."""
    rows = [
        "| # | Figure | A | B | A / B | Target | Holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure in figures:
        holds = "-" if figure.holds is None else ("yes" if figure.holds else "no")
        rows.append(
            f"| {figure.key} | {figure.title} | {figure.a} | {figure.b} | "
            f"{_number(figure.ratio)} | {figure.target} | {holds} |"
        )
    return "\n".join(rows)
