"""The relay end to end with an independent client (websockets) and backend."""

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import idle, wait_for, ws_url


async def test_echo_and_close_code_pass_through(proxied):
    assert proxied.plane.name == "native"
    async with connect(ws_url(proxied, "/chat?room=1")) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send("close 4000 bye from server")
        try:
            await ws.recv()
        except ConnectionClosed as e:
            assert e.rcvd is not None
            assert (e.rcvd.code, e.rcvd.reason) == (4000, "bye from server")
        else:
            raise AssertionError("the backend's close did not arrive")
    await wait_for(lambda: idle(proxied))
    assert proxied.plane.connections() == 0
