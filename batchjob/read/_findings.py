"""What the reader saw in spreadsheets and told the user: a count, the first places, the cure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

#: Places shown per finding; the report has every row.
SHOWN_PLACES: Final = 3
#: The problem text of a hidden row: the plan reports such rows ``skipped``, not ``invalid``.
HIDDEN_PROBLEM: Final = (
    "row hidden in the spreadsheet (filtered out or hidden by hand): not sent; "
    "--include-hidden-rows sends it"
)


@dataclass(frozen=True)
class Finding:
    what: str
    count: int
    places: tuple[str, ...]  # the first SHOWN_PLACES, as "file#Sheet row N"
    cure: str = ""

    def line(self) -> str:
        more = ", ..." if self.count > len(self.places) else ""
        text = f"{self.count} {self.what} ({', '.join(self.places)}{more})"
        return f"{text}: {self.cure}" if self.cure else text


@dataclass(frozen=True)
class ReadSummary:
    """What the reader saw that the user should know: empty for a plain file."""

    headers: tuple[str, ...] = ()  # "header found on row 3 of scans.xlsx#Scans"
    findings: tuple[Finding, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.headers or self.findings)

    def lines(self) -> list[str]:
        return [*self.headers, *(finding.line() for finding in self.findings)]


@dataclass
class Findings:
    """Collects findings while files are read, in the order first seen."""

    headers: list[str] = field(default_factory=list)
    _found: dict[str, tuple[int, list[str], str]] = field(default_factory=dict)

    def add(self, what: str, where: str, rows: npt.NDArray[np.integer], cure: str = "") -> None:
        if not len(rows):
            return
        count, places, _ = self._found.get(what, (0, [], cure))
        for row in rows[: SHOWN_PLACES - len(places)].tolist():
            places.append(f"{where} row {row}")
        self._found[what] = (count + len(rows), places, cure)

    def frozen(self) -> ReadSummary:
        return ReadSummary(
            headers=tuple(self.headers),
            findings=tuple(
                Finding(what, count, tuple(places), cure)
                for what, (count, places, cure) in self._found.items()
            ),
        )
