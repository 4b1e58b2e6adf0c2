"""One-shot calls of ``AsyncClient(transport="aiohttp")`` on aiohttp directly.

Through httpx (request building, URL merging, its cookie jar, stream wrappers) a call cost
~1 ms more than the same request on aiohttp here, a fifth of a create-and-wait round trip
(measured with the bench's end-to-end driver). The answer is handed to the call's decoder
as an ``httpx.Response`` and aiohttp's errors are raised as httpx's (httpx-aiohttp's own
mapping), so retries, errors and messages are those of the httpx path. Streams (``follow``)
stay on httpx over httpx-aiohttp's transport.

The proxy the environment names for the base URL (``HTTP_PROXY`` / ``HTTPS_PROXY`` /
``NO_PROXY``, as httpx's ``trust_env``) is read once, when the session opens: aiohttp's own
``trust_env`` reads it, and ``~/.netrc``, on a worker thread for every request, two thread
hops that cost a create-and-wait ~1 ms here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from httpx_aiohttp.transport import map_aiohttp_exceptions
from yarl import URL

#: Hop-by-hop or body-shaping headers that no longer describe the body aiohttp hands over
#: (already de-chunked and decompressed).
_DROPPED = frozenset({"content-encoding", "transfer-encoding"})


class AiohttpSender:
    """A lazily opened ``aiohttp.ClientSession`` bound to one base URL and header set."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self._base_url = base_url
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: Any,
        connect_s: float,
        read_s: float,
    ) -> httpx.Response:
        if self._session is None:
            proxy, proxy_auth = env_proxy(self._base_url)
            self._session = aiohttp.ClientSession(
                headers=self._headers, proxy=proxy, proxy_auth=proxy_auth
            )
        url = self._base_url + (path if path.startswith("/") else "/" + path)
        # connect: a free connection and the connection itself, as httpx's pool + connect.
        timeout = aiohttp.ClientTimeout(connect=connect_s, sock_connect=connect_s, sock_read=read_s)
        with map_aiohttp_exceptions():
            async with self._session.request(
                method, url, params=params, json=body, timeout=timeout, allow_redirects=False
            ) as answer:
                content = await answer.read()
        headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in _DROPPED]
        return _Answer(answer.status, headers, content, (method, url, params))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Answer(httpx.Response):
    """An ``httpx.Response`` over a body already read, whose ``request`` is built when first
    asked for (an error message names its URL): building it parses the URL again, about a
    fifth of the client's time in a create-and-wait here (cProfile of the bench's
    end-to-end driver)."""

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        content: bytes,
        request: tuple[str, str, dict[str, Any] | None],
    ) -> None:
        # The body as read already (``stream=``): ``content=`` would copy it through
        # httpx's stream and decoder machinery again, ~a third of this class's cost.
        super().__init__(status, headers=headers, stream=httpx.ByteStream(content))
        self._content = content
        self.is_stream_consumed = self.is_closed = True
        self._lazy = request

    @property
    def request(self) -> httpx.Request:
        if self._request is None:
            method, url, params = self._lazy
            self._request = httpx.Request(method, url, params=params)
        return self._request

    @request.setter
    def request(self, value: httpx.Request) -> None:
        self._request = value

    def raise_for_status(self) -> httpx.Response:
        _ = self.request
        return super().raise_for_status()


def env_proxy(base_url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy (and its credentials) the environment names for ``base_url``, if any."""
    with contextlib.suppress(LookupError):
        return get_env_proxy_for_url(URL(base_url))
    return None, None
