"""What a run returns: counts, requests, why it stopped, and the summary printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchjob._logging import printable
from batchjob.read import ReadSummary


@dataclass(frozen=True)
class RunResult:
    report: Path
    failed_rows: Path
    exit_code: int
    counts: dict[str, int]  # report rows by outcome
    per_event: dict[str, dict[str, int]]
    requests: int  # HTTP requests sent (every attempt, including event checks and retries)
    retries: int
    throttled: int
    elapsed: float
    rate: float  # the pacer's rate at the end
    stopped: str = ""  # why the run stopped early, if it did
    duplicates: int = 0
    blank_rows: int = 0
    failed_rows_count: int = 0
    action: str = "undo"  # --action: undo, or check-in
    run_id: str = ""  # short, sortable by time (see new_run_id)
    started_at: str = ""  # UTC, ISO 8601
    ended_at: str = ""
    seen: ReadSummary = field(default_factory=ReadSummary)  # what the reader saw in sheets
    already_done: int = 0  # rows skipped: an earlier run already did them (see --again)
    from_earlier_runs: int = 0  # rows the store added: pending keys, or a reverted run's
    state: str = ""  # the run store's location; "" for none
    recorded: bool = False  # whether the run is in the store (dry runs never are)

    def summary(self) -> str:
        lines = [f"report:      {self.report}"]
        lines.append(f"failed rows: {self.failed_rows} ({self.failed_rows_count} rows)")
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        lines.append(f"outcomes:    {counts or 'no rows'}")
        for event_id, c in self.per_event.items():
            lines.append(f"  {event_id}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v))
        lines.append(
            f"requests:    {self.requests} sent, {self.retries} retries, "
            f"{self.throttled} throttled (429); rate now {self.rate:.2f}/s"
        )
        if self.duplicates or self.blank_rows:
            lines.append(
                f"input:       {self.duplicates} duplicate rows merged, "
                f"{self.blank_rows} blank rows skipped"
            )
        lines.append(f"action:      {self.action} (run {self.run_id})")
        if self.state:
            stored = "recorded in" if self.recorded else "read from (a dry run is not recorded)"
            lines.append(f"store:       {stored} {printable(self.state)}")
        if self.already_done or self.from_earlier_runs:
            lines.append(
                f"incremental: {self.already_done} rows skipped (done by earlier runs), "
                f"{self.from_earlier_runs} rows from earlier runs"
            )
        if self.seen:
            lines.append("spreadsheet:")
            lines.extend(f"  {printable(line)}" for line in self.seen.lines())
        lines.append(f"elapsed:     {self.elapsed:.1f}s")
        if self.stopped:
            lines.append(f"stopped:     {printable(self.stopped)}")
        return "\n".join(lines)
