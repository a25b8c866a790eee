"""Benchmark inputs: sandbox worlds and the matching CSV exports, cached under bench/out/."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from pathlib import Path

from batchjob.sandbox import World

HEADER = ("event_id", "order_ticket_key", "attendee")


def _replace(tmp: Path, final: Path) -> Path:
    os.replace(tmp, final)
    return final


def write_csv(path: Path, rows: Sequence[tuple[str, str]], *, seed: int) -> Path:
    """An export with ``rows`` shuffled (door scans arrive in no order) and one extra column."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows((*rows[i], f"Attendee {i}") for i in order)
    return _replace(tmp, path)


def world_rows(world: World) -> list[tuple[str, str]]:
    return [(event_id, key) for event_id, ev in world.events.items() for key in ev.tickets]


def big_world(directory: Path, events: int, per_event: int, *, seed: int) -> tuple[Path, Path]:
    """A world JSON and the CSV holding every one of its keys; built once, then reused."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"world-{events}x{per_event}-s{seed}"
    world_path = directory / f"{stem}.json"
    csv_path = directory / f"{stem}.csv"
    if world_path.exists() and csv_path.exists():
        return world_path, csv_path
    world = World.generate(events, per_event, seed=seed)
    write_csv(csv_path, world_rows(world), seed=seed)
    tmp = world_path.with_name(world_path.name + ".tmp")
    world.to_json(tmp, indent=None)
    _replace(tmp, world_path)
    return world_path, csv_path


def split_export(csv_path: Path, new: int) -> tuple[Path, list[tuple[str, str]]]:
    """Yesterday's export: ``csv_path`` without its last ``new`` rows (cached beside it), and
    those rows (event, key), the scans since. A cumulative export only ever grows at its end."""
    with csv_path.open(newline="", encoding="utf-8") as fh:
        lines = fh.readlines()
    kept = len(lines) - new  # the header and the older rows
    earlier = csv_path.with_name(f"{csv_path.stem}-first{kept - 1}.csv")
    if not earlier.exists():
        tmp = earlier.with_name(earlier.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as out:
            out.writelines(lines[:kept])
        _replace(tmp, earlier)
    rows = [(row[0], row[1]) for row in csv.reader(lines[kept:])]
    return earlier, rows


def world_with_bad_keys(
    directory: Path, keys: int, bad: int, *, seed: int
) -> tuple[Path, Path, int]:
    """One event whose world knows ``keys - bad`` keys; the CSV adds ``bad`` unknown ones.

    The unknown keys are spread at random through the CSV. Returns (world, csv, good keys).
    """
    directory.mkdir(parents=True, exist_ok=True)
    world = World.generate(1, keys - bad, seed=seed)
    ((event_id, event),) = world.events.items()
    rng = random.Random(seed + 1)
    unknown: set[str] = set()
    while len(unknown) < bad:
        key = format(rng.getrandbits(48), "012x")
        if key not in event.tickets:
            unknown.add(key)
    rows = [(event_id, key) for key in (*event.tickets, *sorted(unknown))]
    stem = f"badkeys-{keys}-{bad}-s{seed}"
    world_path = directory / f"{stem}.json"
    world.to_json(world_path, indent=None)
    csv_path = write_csv(directory / f"{stem}.csv", rows, seed=seed)
    return world_path, csv_path, keys - bad
