"""Regenerate the demo's sample data, byte for byte: ``python sample_data/make_samples.py``.

Three events, and three exports an events team might hand over, each with the flaws real
exports have. What is deliberately wrong (the demo's report should show each of these):

registrants-export.csv (UTF-8, comma, CRLF)
    - one row exported twice (Harbor City summit);
    - one row with an empty Order Ticket Key (Lyon workshop);
    - one row whose Event ID was truncated when pasted, so it is not a UUID;
    - one key with two characters swapped, which the API does not know (Lyon workshop): the
      job has to isolate it from the keys sent with it;
    - four rows for the Volunteer evening, still a DRAFT event, so the API refuses them;
    - one Lyon ticket that was never checked in (undoing it is harmless).
door-scans-eu.csv (cp1252, semicolon, day-first dates): clean, overlaps the registrants file.
door-scans.xlsx: sheets "Main entrance" and "Side door" (columns Scanned At, Event ID,
    Ticket Key, Scanner), and a "Notes" sheet with no such columns. Keys that look like numbers
    are stored as Excel numbers; keys with leading zeros are stored as text.

Keys with leading zeros ("00…") appear in every file: a reader that turns them into numbers
sends keys the API does not know.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import random
import re
import sys
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import openpyxl

from batchjob.sandbox._server import EventState, World

HERE = Path(__file__).resolve().parent
SEED = 20250315
_FIXED_ZIP_TIME = (2025, 3, 16, 9, 0, 0)
_FIXED_DOC_TIME = dt.datetime(2025, 3, 16, 9, 0, 0)

FIRST_NAMES = (
    "Amara",
    "Ben",
    "Chloé",
    "Daniel",
    "Elif",
    "Fatima",
    "Gareth",
    "Hana",
    "Ivan",
    "Jasmine",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Samir",
    "Tessa",
    "Uma",
    "Victor",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoë",
    "Aoife",
    "Bruno",
    "Carmen",
    "Dmitri",
)
LAST_NAMES = (
    "Adeyemi",
    "Bergström",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fernández",
    "Gallagher",
    "Haddad",
    "Ishikawa",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "O'Neill",
    "Petrov",
    "Quinn",
    "Rossi",
    "Schäfer",
    "Tanaka",
    "Umarov",
    "Varga",
    "Whitfield",
    "Xu",
    "Yilmaz",
    "Zimmermann",
    "Okafor",
    "Brennan",
    "Laurent",
    "Novak",
)


def _hex_key(rng: random.Random) -> str:
    while True:
        key = format(rng.getrandbits(48), "012x")
        if not key.startswith("0") and not key.isdigit():
            return key


def _leading_zero_key(rng: random.Random) -> str:
    return f"00{rng.randrange(10**8):08d}"


def _numeric_key(rng: random.Random) -> str:
    return str(rng.randrange(100_000, 1_000_000))


def _keys(
    rng: random.Random, n_hex: int, n_zero: int, n_num: int
) -> tuple[list[str], list[str], list[str]]:
    seen: set[str] = set()

    def unique(make: Callable[[random.Random], str], n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            key = make(rng)
            if key not in seen:
                seen.add(key)
                out.append(key)
        return out

    return unique(_hex_key, n_hex), unique(_leading_zero_key, n_zero), unique(_numeric_key, n_num)


def _person(rng: random.Random) -> tuple[str, str, str]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    ascii_name = (
        f"{first}.{last}".lower().replace("'", "").translate(str.maketrans("éëöäáåø", "eeoaaao"))
    )
    return first, last, f"{ascii_name}@{rng.choice(('example.com', 'example.org', 'example.net'))}"


def _swap_two(key: str, rng: random.Random) -> str:
    while True:
        i = rng.randrange(len(key) - 1)
        if key[i] != key[i + 1]:
            return key[:i] + key[i + 1] + key[i] + key[i + 2 :]


Scan = tuple[dt.datetime, str, str | int, str]


@dataclass
class Samples:
    world: World
    registrants: list[tuple[str, str, str, str, str]]
    eu_rows: list[tuple[str, str, str, str]]
    main_entrance: list[Scan]
    side_door: list[Scan]


def build(rng: random.Random) -> Samples:
    """Everything the files hold, as plain data."""
    harbor_id, lyon_id, gala_id = (
        str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(3)
    )

    # Harbor City summit (COMPLETE): 60 tickets, 52 checked in.
    h_hex, h_zero, h_num = _keys(rng, 42, 9, 9)
    h_unchecked = set(h_hex[34:42])
    # Lyon workshop (ACTIVE): 56 tickets, 48 checked in.
    l_hex, l_zero, l_num = _keys(rng, 40, 10, 6)
    l_unchecked = set(l_hex[32:40])
    # Volunteer evening (DRAFT): nobody can have checked in yet.
    g_hex, _, _ = _keys(rng, 8, 0, 0)

    def tickets(keys: list[str], unchecked: set[str]) -> dict[str, bool]:
        shuffled = keys[:]
        rng.shuffle(shuffled)
        return {k: k not in unchecked for k in shuffled}

    world = World(
        events={
            harbor_id: EventState(
                "COMPLETE",
                tickets(h_hex + h_zero + h_num, h_unchecked),
                name="Harbor City Customer Summit 2025",
            ),
            lyon_id: EventState(
                "ACTIVE",
                tickets(l_hex + l_zero + l_num, l_unchecked),
                name="Partner Workshop Lyon 2025",
            ),
            gala_id: EventState(
                "DRAFT", tickets(g_hex, set(g_hex)), name="Volunteer Appreciation Evening 2026"
            ),
        }
    )

    # -- registrants-export.csv
    harbor_rows = [(harbor_id, k) for k in h_hex[0:19] + h_zero[0:4] + h_num[0:2] + [h_hex[34]]]
    lyon_typo = _swap_two(l_hex[17], rng)
    assert lyon_typo not in world.events[lyon_id].tickets
    lyon_rows = [
        (lyon_id, k) for k in l_hex[0:17] + l_zero[0:4] + l_num[0:2] + [l_hex[32], lyon_typo, ""]
    ]
    gala_rows = [(gala_id, k) for k in g_hex[0:4]]
    rng.shuffle(harbor_rows)
    rng.shuffle(lyon_rows)
    # Pasted from a narrow spreadsheet column: the last block of the UUID got cut short.
    truncated = (harbor_id[:-4], h_hex[19])
    harbor_rows.insert(11, truncated)
    # The same registrant, exported twice.
    harbor_rows.insert(20, (harbor_id, h_hex[0]))
    registrants: list[tuple[str, str, str, str, str]] = []
    people: dict[tuple[str, str], tuple[str, str, str]] = {}
    for event_id, key in harbor_rows + lyon_rows + gala_rows:
        person = people.setdefault((event_id, key), _person(rng))
        registrants.append((event_id, key, *person))

    # -- door-scans-eu.csv: the Lyon doors.
    gates = ("Entrée principale", "Entrée côté Rhône", "Accueil VIP – Salle B")
    eu_keys = l_hex[18:26] + l_zero[4:8] + l_num[2:4] + l_hex[0:4] + l_zero[0:2]
    rng.shuffle(eu_keys)
    start = dt.datetime(2025, 5, 22, 8, 30)
    eu_rows: list[tuple[str, str, str, str]] = []
    moment = start
    for key in eu_keys:
        moment += dt.timedelta(seconds=rng.randrange(20, 140))
        eu_rows.append((lyon_id, key, moment.strftime("%d/%m/%Y %H:%M"), rng.choice(gates)))

    # -- door-scans.xlsx: the Harbor City doors.
    xlsx_keys = (
        h_hex[20:27]
        + h_zero[4:7]
        + h_num[2:9]  # not in the registrants file
        + h_hex[0:3]
        + [h_zero[0], h_num[0]]
    )  # also there
    rng.shuffle(xlsx_keys)
    moment = dt.datetime(2025, 3, 15, 8, 45)
    scans: list[Scan] = []
    for key in xlsx_keys:
        moment += dt.timedelta(seconds=rng.randrange(15, 100))
        # A key of digits without a leading zero became a number in Excel; the others
        # were typed in as text.
        cell: str | int = int(key) if key.isdigit() and not key.startswith("0") else key
        scans.append((moment, harbor_id, cell, rng.choice(("DS-01", "DS-02", "DS-03"))))
    return Samples(world, registrants, eu_rows, main_entrance=scans[:13], side_door=scans[13:])


def _write_csv(
    path: Path,
    header: tuple[str, ...],
    rows: Sequence[tuple[str, ...]],
    *,
    delimiter: str,
    encoding: str,
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))


def _deterministic_zip(data: bytes) -> bytes:
    """openpyxl stamps the save time into the file twice; pin both to a fixed moment."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                content = re.sub(
                    rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)",
                    rb"\g<1>" + _FIXED_DOC_TIME.strftime("%Y-%m-%dT%H:%M:%SZ").encode() + rb"\g<2>",
                    content,
                )
            fixed = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, content)
    return out.getvalue()


def _write_xlsx(path: Path, data: Samples) -> None:
    book = openpyxl.Workbook()
    book.properties.creator = "Events Team"
    book.properties.created = _FIXED_DOC_TIME
    header = ("Scanned At", "Event ID", "Ticket Key", "Scanner")
    for index, (title, scans) in enumerate(
        (("Main entrance", data.main_entrance), ("Side door", data.side_door))
    ):
        sheet = book.active if index == 0 else book.create_sheet()
        sheet.title = title
        sheet.append(header)
        for when, event_id, ticket, scanner in scans:
            sheet.append((when, event_id, ticket, scanner))
            sheet.cell(row=sheet.max_row, column=1).number_format = "dd/mm/yyyy hh:mm"
        for column, width in zip("ABCD", (18, 40, 16, 10), strict=True):
            sheet.column_dimensions[column].width = width
    notes = book.create_sheet("Notes")
    for line in (
        "Door scan export - Harbor City Customer Summit 2025 (15 March 2025)",
        "Exported from the door app by the events team.",
        "Side door opened at 08:59 for the keynote rush; scanners DS-01 and DS-02 moved there.",
        "Keys that are all digits were typed in by hand at the desk: Excel shows them as numbers.",
    ):
        notes.append((line,))
    buffer = io.BytesIO()
    book.save(buffer)
    path.write_bytes(_deterministic_zip(buffer.getvalue()))


def write_samples(out_dir: Path) -> None:
    data = build(random.Random(SEED))
    out_dir.mkdir(parents=True, exist_ok=True)
    data.world.to_json(out_dir / "sandbox_world.json")
    _write_csv(
        out_dir / "registrants-export.csv",
        ("Event ID", "Order Ticket Key", "First Name", "Last Name", "Email"),
        data.registrants,
        delimiter=",",
        encoding="utf-8",
    )
    _write_csv(
        out_dir / "door-scans-eu.csv",
        ("event_id", "ticket_key", "scanned_at", "gate"),
        data.eu_rows,
        delimiter=";",
        encoding="cp1252",
    )
    _write_xlsx(out_dir / "door-scans.xlsx", data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = parser.parse_args(argv)
    write_samples(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
