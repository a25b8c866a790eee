"""The sandbox as a program: ``python -m batchjob.sandbox`` (and ``batchjob sandbox``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TextIO

from batchjob.sandbox._server import Faults, Sandbox, SandboxSettings, World, _check_share

# --------------------------------------------------------------------------------------------
# Command line: `batchjob sandbox ...` and `python -m batchjob.sandbox ...`


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in {"none", "off", "unlimited"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number (or 'none'): {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in {"none", "off", "unlimited"}:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer (or 'none'): {text!r}") from None


def _share(text: str) -> float:
    try:
        return _check_share("share", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1: {text!r}") from None


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options. Every dest starts with ``sandbox_`` so a parent parser's
    options of the same name (--seed, --rate, ...) are never overwritten by our defaults."""
    parser.add_argument(
        "--port",
        dest="sandbox_port",
        type=int,
        default=8080,
        help="port on 127.0.0.1 (0 = any free port; default 8080)",
    )
    parser.add_argument(
        "--world",
        dest="sandbox_world",
        type=Path,
        default=None,
        help="world JSON file (default: a generated world)",
    )
    parser.add_argument(
        "--events",
        dest="sandbox_events",
        type=int,
        default=3,
        help="events in a generated world (default 3)",
    )
    parser.add_argument(
        "--tickets-per-event",
        dest="sandbox_tickets",
        type=int,
        default=1000,
        help="tickets per event in a generated world (default 1000)",
    )
    parser.add_argument(
        "--rate",
        dest="sandbox_rate",
        type=_optional_float,
        default=4.0,
        help="requests per second, or 'none' (default 4)",
    )
    parser.add_argument(
        "--burst",
        dest="sandbox_burst",
        type=float,
        default=1.0,
        help="bucket capacity in requests (default 1: no burst)",
    )
    parser.add_argument(
        "--quota",
        dest="sandbox_quota",
        type=_optional_int,
        default=10_000,
        help="daily request quota, or 'none' (default 10000)",
    )
    parser.add_argument(
        "--max-keys",
        dest="sandbox_max_keys",
        type=_optional_int,
        default=None,
        help="refuse requests with more keys with 413",
    )
    parser.add_argument(
        "--token",
        dest="sandbox_token",
        default=None,
        help="access token to accept (default: random)",
    )
    parser.add_argument(
        "--refresh-token",
        dest="sandbox_refresh_token",
        default=None,
        help="first refresh token (default: random)",
    )
    parser.add_argument("--client-id", dest="sandbox_client_id", default="sandbox-client")
    parser.add_argument(
        "--token-ttl",
        dest="sandbox_token_ttl",
        type=_optional_float,
        default=None,
        help="access token lifetime in seconds (default: forever)",
    )
    parser.add_argument(
        "--long-lived-refresh-tokens",
        dest="sandbox_long_lived",
        action="store_true",
        help="do not rotate refresh tokens",
    )
    parser.add_argument(
        "--seed",
        dest="sandbox_seed",
        type=int,
        default=None,
        help="seed for fault decisions and the generated world",
    )
    faults = parser.add_argument_group("faults (shares of /v3 requests, 0..1)")
    for flag, name in (
        ("--error-500", "error_500"),
        ("--error-503", "error_503"),
        ("--drop", "drop"),
        ("--lost-reply", "lost_reply"),
        ("--slow", "slow"),
        ("--throttle-storm", "throttle_storm"),
    ):
        faults.add_argument(
            flag, dest=f"sandbox_fault_{name}", type=_share, default=0.0, metavar="SHARE"
        )
    faults.add_argument(
        "--slow-seconds",
        dest="sandbox_fault_slow_seconds",
        type=float,
        default=1.0,
        help="delay of a slow request (default 1.0)",
    )
    parser.add_argument(
        "--no-record-requests",
        dest="sandbox_record_requests",
        action="store_false",
        help="keep counters only, not every request (bounds memory)",
    )
    parser.add_argument(
        "--log-requests",
        dest="sandbox_log_requests",
        action="store_true",
        help="log every API request to stderr (slows the server down)",
    )


def _sandbox_from_args(args: argparse.Namespace) -> Sandbox:
    if args.sandbox_world is not None:
        world = World.from_json(args.sandbox_world)
    else:
        world = World.generate(
            args.sandbox_events,
            args.sandbox_tickets,
            seed=args.sandbox_seed if args.sandbox_seed is not None else 0,
        )
    settings = SandboxSettings(
        rate=args.sandbox_rate,
        burst=args.sandbox_burst,
        daily_quota=args.sandbox_quota,
        max_keys_per_request=args.sandbox_max_keys,
        access_token_ttl=args.sandbox_token_ttl,
        seed=args.sandbox_seed,
        rotate_refresh_tokens=not args.sandbox_long_lived,
    )
    faults = Faults(**{f.name: getattr(args, f"sandbox_fault_{f.name}") for f in fields(Faults)})
    return Sandbox(
        world,
        settings,
        faults,
        access_token=args.sandbox_token,
        refresh_token=args.sandbox_refresh_token,
        client_id=args.sandbox_client_id,
        log_requests=args.sandbox_log_requests,
        record_requests=args.sandbox_record_requests,
    )


async def serve(
    sandbox: Sandbox,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set).

    On start, one JSON line with the URLs and credentials goes to ``out`` (stdout) for a parent
    process to read; the human line goes to stderr and carries no token.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        await sandbox.start(host, port)
        stream = out if out is not None else sys.stdout
        stream.write(
            json.dumps(
                {
                    "base_url": sandbox.base_url,
                    "token_url": sandbox.token_url,
                    "access_token": sandbox.access_token,
                    "refresh_token": sandbox.refresh_token,
                    "client_id": sandbox.client_id,
                }
            )
            + "\n"
        )
        stream.flush()
        s = sandbox.settings
        rate = f"{s.rate:g} req/s (burst {s.burst:g})" if s.rate is not None else "no rate limit"
        quota = f"quota {s.daily_quota}/day" if s.daily_quota is not None else "no daily quota"
        print(
            f"sandbox: {sandbox.base_url} serving {len(sandbox.world.events)} events, "
            f"{rate}, {quota}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await sandbox.stop()


def run_sandbox_command(args: argparse.Namespace) -> int:
    """Entry point for the ``sandbox`` subcommand; returns the exit status."""
    if args.sandbox_log_requests:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        sandbox = _sandbox_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(sandbox, port=args.sandbox_port))
    except OSError as exc:  # typically: port already in use
        print(f"sandbox: cannot listen on port {args.sandbox_port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main_sandbox(
    argv: Sequence[str] | None = None, *, prog: str = "python -m batchjob.sandbox"
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a fake Constant Contact V3 events API on 127.0.0.1.",
    )
    add_sandbox_arguments(parser)
    return run_sandbox_command(parser.parse_args(argv))
