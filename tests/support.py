"""Helpers for tests: writing inputs, reading reports, running the real job on the sandbox."""

from __future__ import annotations

import csv
import io
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from batchjob import JobConfig, RunResult, Secret, StaticToken, run_job
from batchjob._logging import Redactor, make_logger
from batchjob.sandbox import Sandbox, World

# Fast but real: the sandbox limits at 400/s, the job paces at 300/s, backoff waits are short.
FAST = {"rate": 300.0, "concurrency": 8, "retry_base": 0.005, "retry_cap": 0.05}


def write_csv(path: Path, rows: Iterable[Sequence[str]], header: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ticket_rows(world: World) -> list[tuple[str, str]]:
    return [(event_id, key) for event_id, ev in world.events.items() for key in ev.tickets]


def read_report(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


async def run(
    sandbox: Sandbox,
    inputs: Sequence[Path],
    tmp_path: Path,
    *,
    report: str = "report.csv",
    log: io.StringIO | None = None,
    **settings: Any,
) -> RunResult:
    config = JobConfig(
        inputs=tuple(inputs),
        report=tmp_path / report,
        base_url=sandbox.base_url,
        token_url=sandbox.token_url,
        **(FAST | settings),
    )
    tokens = token_for(sandbox)
    logger = make_logger(
        log_format="json",
        level="debug",
        redactor=Redactor([sandbox.access_token]),
        stream=log or io.StringIO(),
    )
    return await run_job(config, tokens=tokens, log=logger)


def token_for(sandbox: Sandbox) -> StaticToken:
    return StaticToken(Secret(sandbox.access_token))


def compound_file(stream: bytes) -> bytes:
    """An .xls file: one "Workbook" stream in a compound file (sector 0 the FAT, 1 the
    directory, then the stream), as nothing installed here writes one."""
    sectors = -(-len(stream) // 512)
    assert sectors + 2 <= 128, "one FAT sector only"
    fat = [0xFFFFFFFD, 0xFFFFFFFE] + [3 + i for i in range(sectors - 1)] + [0xFFFFFFFE]
    fat += [0xFFFFFFFF] * (128 - len(fat))
    header = bytearray(512)
    header[:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    struct.pack_into("<HHHH", header, 0x18, 0x3E, 3, 0xFFFE, 9)
    struct.pack_into("<H", header, 0x20, 6)
    struct.pack_into("<IIIIIIII", header, 0x2C, 1, 1, 0, 4096, 0xFFFFFFFE, 0, 0xFFFFFFFE, 0)
    struct.pack_into("<109I", header, 0x4C, 0, *([0xFFFFFFFF] * 108))

    def entry(name: str, kind: int, start: int, size: int) -> bytes:
        raw = bytearray(128)
        encoded = (name + "\0").encode("utf-16-le")
        raw[: len(encoded)] = encoded
        struct.pack_into("<HBB", raw, 0x40, len(encoded), kind, 1)
        struct.pack_into("<III", raw, 0x44, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF if kind != 5 else 1)
        struct.pack_into("<IQ", raw, 0x74, start, size)
        return bytes(raw)

    directory = entry("Root Entry", 5, 0xFFFFFFFE, 0) + entry("Workbook", 2, 2, len(stream))
    directory += bytes(512 - len(directory))
    body = struct.pack("<128I", *fat) + directory + stream + bytes(sectors * 512 - len(stream))
    return bytes(header) + body


def write_ods_content(path: Path, content: str) -> Path:
    """An .ods file holding ``content`` (its content.xml), with the parts a reader expects."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr(
            "META-INF/manifest.xml",
            '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest xmlns:manifest='
            '"urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
            '<manifest:file-entry manifest:full-path="/" manifest:media-type='
            '"application/vnd.oasis.opendocument.spreadsheet"/><manifest:file-entry '
            'manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
            "</manifest:manifest>",
        )
        archive.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
    return path
