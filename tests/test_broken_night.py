"""Honest endings: a run that cannot reach the API, or finds none of its events, stops with
exit 3 and leaves its keys ``not_attempted`` (for the next run), never ``failed``."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from batchjob import JobConfig, run_job
from batchjob.sandbox import Sandbox, World
from batchjob.send import AiohttpTransport, RawResponse, Transport, TransportError
from tests.support import FAST, read_report, run, ticket_rows, token_for, write_csv

HEADER = ("Event ID", "Order Ticket Key")
#: Short retries: a request gives up after 4 tries within a second; the API counts as
#: unreachable after 0.3 s with no HTTP answer (60 s by default).
QUICK: dict[str, Any] = {
    "retry_max_tries": 4,
    "retry_max_time": 1.0,
    "retry_base": 0.001,
    "retry_cap": 0.01,
    "connect_timeout": 5.0,
    "unreachable_after": 0.3,
}


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def inputs_for(world: World, tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)


async def run_against(
    base_url: str, inputs: Path, tmp_path: Path, sandbox: Sandbox, **settings: Any
) -> Any:
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / "report.csv",
        base_url=base_url,
        **(FAST | QUICK | settings),
    )
    return await run_job(config, tokens=token_for(sandbox))


async def test_connection_refused_from_the_start_stops_the_run_with_keys_left_for_later(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = inputs_for(world, tmp_path)

    result = await run_against(
        f"http://127.0.0.1:{closed_port()}/v3", inputs, tmp_path, sandbox, concurrency=2
    )

    assert result.exit_code == 3
    assert "cannot be reached (connection refused" in result.stopped
    report = read_report(result.report)
    assert set(report.outcome) == {"not_attempted"}
    assert report.error_message.str.contains("cannot be reached").all()
    # Not every key's retries: the first request to spend its budget stopped the run.
    assert result.requests < len(report)
    assert result.failed_rows_count == len(report)
    # Refused connections carried nothing: no row says the server may have applied it.
    assert not report.error_message.str.contains("may have applied").any()


class StopServerAfter:
    """Forwards to the real transport; before the ``n``-th POST, shuts the sandbox down, so
    that from then on every connection is refused (a mid-run outage)."""

    def __init__(self, inner: Transport, sandbox: Sandbox, n: int) -> None:
        self.inner, self.sandbox, self.n = inner, sandbox, n
        self.posts = 0

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        if method == "POST":
            self.posts += 1
            if self.posts == self.n:
                await self.sandbox.stop()
        return await self.inner.request(method, url, headers=headers, body=body)


async def test_an_outage_mid_run_stops_it_and_the_rest_is_not_attempted(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = inputs_for(world, tmp_path)
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / "report.csv",
        base_url=sandbox.base_url,
        **(FAST | QUICK | {"batch_size": 20, "concurrency": 2}),
    )
    async with aiohttp.ClientSession() as session:
        transport = StopServerAfter(AiohttpTransport(session), sandbox, n=5)
        result = await run_job(config, tokens=token_for(sandbox), transport=transport)

    assert result.exit_code == 3, result.summary()
    assert "connection refused" in result.stopped
    report = read_report(result.report)
    undone = report[report.outcome == "undone"]
    assert 0 < len(undone) <= 4 * 20
    # Everything else is left for the next run: none of it is failed.
    assert set(report.outcome) == {"undone", "not_attempted"}
    for event_id, key in zip(undone.event_id, undone.order_ticket_key, strict=True):
        assert not world.checked_in(event_id, key)


class BlipAfter:
    """Forwards to the real transport; before the ``n``-th POST, shuts the sandbox down for
    ``seconds`` and brings it back on the same port: a network blip."""

    def __init__(self, inner: Transport, sandbox: Sandbox, n: int, seconds: float) -> None:
        self.inner, self.sandbox, self.n, self.seconds = inner, sandbox, n, seconds
        self.posts = 0
        self.back: asyncio.Task[None] | None = None

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        if method == "POST":
            self.posts += 1
            if self.posts == self.n:
                port = self.sandbox.port
                await self.sandbox.stop()
                self.back = asyncio.ensure_future(self._restart(port))
        return await self.inner.request(method, url, headers=headers, body=body)

    async def _restart(self, port: int) -> None:
        await asyncio.sleep(self.seconds)
        await self.sandbox.start(port=port)


async def test_a_blip_longer_than_a_request_s_retries_does_not_stop_the_night(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    """Refused connections for 1.5 s, three times a request's retry budget (0.5 s): the
    requests keep trying until the silence would be an outage (60 s by default), and every
    key is undone. Before, the first request out of budget stopped the run (exit 3)."""
    inputs = inputs_for(world, tmp_path)
    settings = {"batch_size": 20, "concurrency": 2, "retry_max_time": 0.5, "retry_cap": 0.05}
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / "report.csv",
        base_url=sandbox.base_url,
        **(FAST | QUICK | settings | {"unreachable_after": 60.0}),
    )
    async with aiohttp.ClientSession() as session:
        blip = BlipAfter(AiohttpTransport(session), sandbox, n=3, seconds=1.5)
        result = await run_job(config, tokens=token_for(sandbox), transport=blip)

    assert result.exit_code == 0, result.summary()
    assert set(read_report(result.report).outcome) == {"undone"}


class RefuseEveryThird:
    """Every third try goes to a closed port (a real refused connection from the real
    client), the others to the sandbox: a load balancer with one backend down."""

    def __init__(self, inner: Transport, base_url: str) -> None:
        self.inner, self.base_url = inner, base_url
        self.closed = f"http://127.0.0.1:{closed_port()}/v3"
        self.tries = 0
        self.refused = 0

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        self.tries += 1
        if self.tries % 3 == 0:
            self.refused += 1
            url = url.replace(self.base_url, self.closed)
        return await self.inner.request(method, url, headers=headers, body=body)


async def test_connections_refused_among_answered_ones_are_retried_not_a_stop(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = inputs_for(world, tmp_path)
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / "report.csv",
        base_url=sandbox.base_url,
        **(FAST | QUICK | {"batch_size": 20}),
    )
    async with aiohttp.ClientSession() as session:
        transport = RefuseEveryThird(AiohttpTransport(session), sandbox.base_url)
        result = await run_job(config, tokens=token_for(sandbox), transport=transport)

    assert transport.refused > 5
    assert result.exit_code == 0, result.summary()
    assert not result.stopped
    report = read_report(result.report)
    # A refused connection sent nothing: no row says the server may have applied it.
    assert not report.error_message.str.contains("may have applied").any()


async def test_a_server_that_drops_half_its_connections_is_not_an_outage(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    # Some requests are answered, others lose their connection: retried, never a stop.
    sandbox.faults.drop = 0.5
    inputs = inputs_for(world, tmp_path)

    result = await run(sandbox, [inputs], tmp_path, batch_size=25, retry_max_tries=14)

    assert result.exit_code == 0, result.summary()
    assert not result.stopped
    assert sandbox.counters.dropped > 0


async def test_every_event_check_404_stops_the_run_suggesting_the_base_url(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = inputs_for(world, tmp_path)
    # The right server, the wrong path: every request answers 404.
    wrong = sandbox.base_url.replace("/v3", "/v2")

    result = await run_against(wrong, inputs, tmp_path, sandbox)

    assert result.exit_code == 3
    assert "every event check answered 404" in result.stopped
    assert "--base-url" in result.stopped
    report = read_report(result.report)
    assert set(report.outcome) == {"not_attempted"}
    assert result.requests == len(world.events)  # one GET per event, nothing more


async def test_a_single_event_not_found_names_its_event_id_first(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A typo in the only event id: the message points at that id before the URL."""
    typo = "00000000-0000-4000-8000-0000000000ee"
    inputs = write_csv(tmp_path / "in.csv", [(typo, "k1"), (typo, "k2")], HEADER)

    result = await run_against(sandbox.base_url, inputs, tmp_path, sandbox)

    assert result.exit_code == 3
    assert f"event {typo} was not found: check that event id" in result.stopped


async def test_one_missing_event_among_found_ones_is_that_events_failure(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    missing = "00000000-0000-4000-8000-000000000404"
    rows = [(missing, "k1"), (missing, "k2"), *ticket_rows(world)]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)

    result = await run(sandbox, [inputs], tmp_path)

    assert result.exit_code == 1, result.summary()
    assert not result.stopped
    report = read_report(result.report)
    gone = report[report.event_id == missing]
    assert set(gone.outcome) == {"failed"}
    assert set(gone.error_key) == {"event.not_found"}
    assert (report[report.event_id != missing].outcome == "undone").all()


class NoDns(AbstractResolver):
    """A resolver that fails every lookup as getaddrinfo does: no lookup leaves the machine."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


async def test_a_dns_failure_is_named_as_the_cause(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    connector = aiohttp.TCPConnector(resolver=NoDns())
    async with aiohttp.ClientSession(connector=connector) as session:
        transport = AiohttpTransport(session)
        with pytest.raises(TransportError) as caught:
            await transport.request(
                "GET", "https://api.cc.invalid/v3/events", headers={}, body=None
            )
        assert caught.value.cause == "DNS lookup failed"

        config = JobConfig(
            inputs=(inputs_for(world, tmp_path),),
            report=tmp_path / "report.csv",
            base_url="https://api.cc.invalid/v3",
            **(FAST | QUICK),
        )
        result = await run_job(config, tokens=token_for(sandbox), transport=transport)
    assert result.exit_code == 3
    assert "cannot be reached (DNS lookup failed" in result.stopped
    assert set(read_report(result.report).outcome) == {"not_attempted"}


async def test_a_tls_failure_is_named_as_the_cause(sandbox: Sandbox) -> None:
    # https:// to a server that speaks plain HTTP: the handshake fails on every try.
    https = sandbox.base_url.replace("http://", "https://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TransportError) as caught:
            await asyncio.wait_for(
                AiohttpTransport(session).request("GET", https + "/events", headers={}, body=None),
                30,
            )
    assert caught.value.cause == "TLS handshake failed"


async def test_the_command_line_exits_3_naming_the_cause(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    from tests.chaos_support import cli, cli_env

    inputs = inputs_for(world, tmp_path)
    env = cli_env(sandbox, CC_BASE_URL=f"http://127.0.0.1:{closed_port()}/v3")
    config = tmp_path / "c.toml"
    config.write_text(
        "retry_max_tries = 2\nretry_base = 0.001\nretry_cap = 0.01\n"
        "retry_max_time = 1.0\nunreachable_after = 0.3\n"
    )
    done = await cli(
        "run", str(inputs), "--report", str(tmp_path / "r.csv"), "--config", str(config), env=env
    )
    assert done.code == 3, done
    assert "connection refused" in done.out
