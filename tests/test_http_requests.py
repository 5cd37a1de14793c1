"""Plain HTTP requests are counted and logged as an SRE reads nginx's: per route
and status class in /metrics, timed, and one `access` line each when
`telemetry.access_log` asks for them."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import load_settings
from tests.conftest import free_port, loopwatch, raw_exchange, read_response, wait_for
from tests.test_http import Backend, leave_mid_response
from tests.test_logs import captured, check_documented

RUN_ON_UVLOOP = True


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    text = await asyncio.to_thread(get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests(samples: dict, route: str, code: str) -> float:
    return samples[("loopwatch_http_requests_total", frozenset({("route", route), ("code", code)}))]


def observed(samples: dict, route: str) -> float:
    return samples[("loopwatch_http_request_duration_seconds_count", frozenset({("route", route)}))]


async def exchange_all(port: int) -> None:
    """Three plain requests to / (200, 201, 404) and one to /down (loopwatch's 502)."""
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"
        async with session.get(base + "/echo?token=secret") as resp:
            assert resp.status == 200
        async with session.get(base + "/created") as resp:
            assert resp.status == 201
        async with session.get(base + "/missing") as resp:
            assert resp.status == 404
        async with session.get(base + "/down/x") as resp:
            assert resp.status == 502


async def test_plain_requests_are_counted_by_route_and_status_class_and_logged() -> None:
    async with Backend() as backend:
        routes = [
            {"path_prefix": "/", "upstream": backend.url},
            {"path_prefix": "/down", "upstream": f"http://127.0.0.1:{free_port()}"},
        ]
        with captured() as lines:
            async with loopwatch(None, routes=routes, **{"telemetry.access_log": "all"}) as lw:  # type: ignore[arg-type]
                before = await scrape(lw.admin_port)
                # Every configured route is there from the start, at 0.
                assert requests(before, "/", "2xx") == 0 and requests(before, "/down", "5xx") == 0
                await exchange_all(lw.proxy_port)
                # A client that leaves once the response head came: its status is
                # counted, and its line says it left.
                await leave_mid_response(backend, lw)
                await wait_for(lambda: len([x for x in lines.refresh() if x.get("method")]) == 5)
                after = await scrape(lw.admin_port)
        assert requests(after, "/", "2xx") == 3
        assert requests(after, "/", "4xx") == 1
        assert requests(after, "/down", "5xx") == 1
        assert requests(after, "/", "none") == 0
        assert observed(after, "/") == 4 and observed(after, "/down") == 1
        inf = ("loopwatch_http_request_duration_seconds_bucket", frozenset({("route", "/"), ("le", "+Inf")}))
        assert after[inf] == 4

    access = [x for x in lines if x["event"] == "access"]
    check_documented(access)
    by_path = {x["path"]: x for x in access}
    ok = by_path["/echo"]  # without its query, which may carry a token
    assert "secret" not in str(ok)
    assert ok["method"] == "GET" and ok["status"] == 200 and ok["outcome"] == "forwarded"
    assert ok["route"] == "/" and ok["peer"] == "127.0.0.1" and ok["bytes_in"] == 0
    assert ok["bytes_out"] > 100 and 0 < ok["duration"] < 10
    assert by_path["/missing"]["status"] == 404
    down = by_path["/down/x"]
    assert (down["status"], down["outcome"], down["bytes_out"]) == (502, "answered", 0)
    gone = by_path["/slow"]
    assert (gone["status"], gone["outcome"]) == (200, "client_gone")


async def test_without_access_lines_requests_are_still_counted(tmp_path: Path) -> None:
    """`access_log: off` (the default) makes no line; a reload that turns lines on
    applies to the next request, and keeps the route's counts."""
    async with Backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = f'upstream: "{backend.url}"\nlisten: "127.0.0.1:0"\nadmin:\n  listen: "127.0.0.1:0"\n'
        config.write_text(base)
        with captured() as lines:
            lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
            try:
                request = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                response, _ = await raw_exchange(lw.proxy_port, request)
                assert response.status == 200
                config.write_text(base + "telemetry:\n  access_log: all\n")
                assert lw.reload()["reloaded"] is True
                response, _ = await raw_exchange(lw.proxy_port, request)
                assert response.status == 200
                await wait_for(lambda: any(x["event"] == "access" for x in lines.refresh()))
                samples = await scrape(lw.admin_port)
            finally:
                await lw.close()
        assert requests(samples, "/", "2xx") == 2
        assert [x["path"] for x in lines if x["event"] == "access"] == ["/echo"]


async def test_a_client_that_leaves_while_its_response_is_awaited_is_gone() -> None:
    """A client that gives up on a slow backend (it closes its socket) got no
    answer: counted `none` at the time it left, its line saying so, not the
    backend's 200 it never read (the probe: 2xx, 1.5 s, 37 bytes out; nginx
    logs 499 at 0.3 s). A client that sends its next request while the last
    one's response is awaited still gets both answers, in order."""
    async with Backend() as backend:
        with captured() as lines:
            async with loopwatch(backend.url, **{"telemetry.access_log": "all"}) as lw:
                reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
                writer.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.close()  # its end (FIN): gone
                await wait_for(lambda: any(x.get("path") == "/late" for x in lines.refresh()))
                samples = await scrape(lw.admin_port)
                assert requests(samples, "/", "none") == 1 and requests(samples, "/", "2xx") == 0
                # Its next request sent while the first is awaited: both answered.
                reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
                writer.write(b"GET /late?s=0.4&n=one HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(b"GET /late?s=0&n=two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                first = await asyncio.wait_for(read_response(reader), 10)
                second = await asyncio.wait_for(read_response(reader), 10)
                writer.close()
                assert (first.status, first.body, second.status, second.body) == (200, b"one\n", 200, b"two\n")
        gone = next(x for x in lines if x.get("path") == "/late" and x["outcome"] == "client_gone")
        assert "status" not in gone and gone["bytes_out"] == 0 and gone["duration"] < 1.0
