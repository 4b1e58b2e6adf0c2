"""Push wake-ups for requests that await a task (long-poll, SSE) without polling Redis.

Every transition script ``PUBLISH``es the task's new status on ``<prefix>ev:<taskId>``
(``emit`` in ``store/lua/lib.lua``), except the creation's own steps: every route that
watches a task reads it first, so nobody can watch one that does not exist yet. Each API
process keeps ONE Pub/Sub connection here: a waiting request :meth:`TaskNotifier.watch` es
its task, which SUBSCRIBEs the task's channel (on first interest; UNSUBSCRIBE after the
last) and waits until Redis has confirmed it.
Only then does the request read the task's state, so a transition can never slip between
the read and the wait (no lost wake-up). Messages are dispatched to each watcher's small
queue; the request re-reads the state when woken.

A final status is also published on ``<prefix>evf:<taskId>``: a request that awaits only
the end (create with ``wait``) watches that channel (``watch(final=True)``) and is not woken
by the steps on the way (queued, started, progress). A task this process creates and awaits
at once needs no SUBSCRIBE, and so no round trip before the create: it gets an id from
:meth:`TaskNotifier.own_task_id`, which starts with this process's random tag, and the
connection holds one ``PSUBSCRIBE`` of every final channel with that tag
(``<prefix>evf:task_<tag>*``), confirmed before the connection counts as up. Every other
watch, in this process or another, subscribes its channel the usual way.

When the connection drops (Redis restart), every watcher is told :data:`RESYNC` and, until
the channel is subscribed again, :meth:`Watch.next` returns after at most
:data:`FALLBACK_S`, so waiting requests fall back to re-reading the state; the reader
reconnects with backoff, resubscribes every watched channel and tells their watchers to
re-read once more. A quiet connection is pinged, and one that stops answering is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gpuflow.core.errors import Unavailable
from gpuflow.core.models import TERMINAL_STATUSES

log = logging.getLogger("gpuflow.notify")
Read = Callable[[], Awaitable[dict[str, Any]]]  # the task's current view (it has "status")

RESYNC = ""  # a note that means "you may have missed something: re-read the state"
FALLBACK_S = 0.5  # how often a watcher without a confirmed subscription re-reads
CONFIRM_S = 2.0  # how long a new watcher waits for its SUBSCRIBE to be confirmed
PING_S = 10.0  # a quiet connection is pinged this often; dead after 3 unanswered
QUEUE_MAX = 16  # a watcher's unread notes; more are dropped (the reader re-reads anyway)
MAX_WATCHERS = 10_000
RECONNECT_MAX_S = 2.0
RESYNC_S = 5.0  # a waiting request re-reads the state this often even without a note
CLIENT_NAME = "gpuflow-notify"  # as CLIENT LIST shows the Pub/Sub connection


class Watch:
    """One waiting request's interest in one task: the notes published for it."""

    def __init__(self, hub: TaskNotifier, chan: _Chan) -> None:
        self._hub = hub
        self._chan = chan
        self._notes: asyncio.Queue[str] = asyncio.Queue(maxsize=QUEUE_MAX)

    @property
    def live(self) -> bool:
        """True while the task's channel is subscribed and confirmed."""
        return self._hub.connected and self._chan.ready.is_set()

    def push(self, note: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._notes.put_nowait(note)  # a full queue already makes the reader re-read

    async def next(self, within: float) -> str | None:
        """The next note (the task's new status, maybe followed by a newline and its fields
        (``emit`` in lib.lua), or :data:`RESYNC`), or None when ``within`` seconds pass first.
        Not live, it waits at most :data:`FALLBACK_S`."""
        if not self._notes.empty():
            return self._notes.get_nowait()
        if not self.live:
            within = min(within, FALLBACK_S)
        if within <= 0:
            return None
        try:
            async with asyncio.timeout(within):
                return await self._notes.get()
        except TimeoutError:
            return None


async def settle(
    watch: Watch,
    deadline: float,
    read: Read,
    view: dict[str, Any] | None = None,
    view_of: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``read()`` once the watched task is final, or at the loop time ``deadline`` (its
    current state then). ``view``: a state read while ``watch`` was already live (None:
    only a note has been seen so far, e.g. when the caller created the task itself).
    ``view_of``: what ``read()`` would answer, from the fields a final note carries (a
    task created ``awaited``); such a note then needs no read."""
    loop = asyncio.get_running_loop()
    while view is None or view["status"] not in TERMINAL_STATUSES:
        left = deadline - loop.time()
        if left <= 0:
            break
        note = await watch.next(min(left, RESYNC_S))
        status, _, fields = (note or "").partition("\n")
        if status and status not in TERMINAL_STATUSES:
            continue  # progress, or back in the queue: nothing to answer yet
        view = None
        if fields and view_of is not None:
            with contextlib.suppress(ValueError, TypeError):  # a note it cannot read: read
                view = view_of(fields)
        if view is None:
            view = await read()
    return view if view is not None else await read()


@dataclass(eq=False)
class _Chan:
    name: str
    watchers: set[Watch] = field(default_factory=set)
    subscribed: bool = False  # the last command sent (or queued) for it is SUBSCRIBE
    pending: int = 0  # SUBSCRIBEs sent and not yet confirmed
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = False  # tell the watchers to re-read once confirmed (after a reconnect)
    own: bool = False  # covered by the connection's pattern: never SUBSCRIBEd on its own


class TaskNotifier:
    """The process's shared Pub/Sub connection and the watchers it wakes."""

    def __init__(self, url: str, namespace: str, *, max_watchers: int = MAX_WATCHERS) -> None:
        self._url = url
        self._prefix = f"{namespace}ev:"
        self._final_prefix = f"{namespace}evf:"
        self._tag = secrets.token_hex(4)
        self._own = f"{self._final_prefix}task_{self._tag}"
        self._pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._own) + "*"
        self.max_watchers = max_watchers
        self._chans: dict[str, _Chan] = {}
        self._watchers = 0
        self._client: Redis | None = None
        self._pubsub: Any = None
        self._commands: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.connected = False

    def channel(self, task_id: str, final: bool = False) -> str:
        """The channel of every transition of the task, or (``final``) of its end only."""
        return (self._final_prefix if final else self._prefix) + task_id

    def own_task_id(self) -> str:
        """A fresh task id (the usual 32 hex digits) whose end this process can watch
        without a SUBSCRIBE (``watch(id, final=True)``): for a task it is about to create and
        await."""
        return f"task_{self._tag}{uuid.uuid4().hex[8:]}"

    @property
    def watchers(self) -> int:
        return self._watchers

    def check_capacity(self) -> None:
        if self._watchers >= self.max_watchers:
            raise Unavailable(f"{self._watchers} requests are already waiting; retry shortly")

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._reader = asyncio.create_task(self._run(), name="gpuflow-notify")

    async def close(self) -> None:
        for task in (self._reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reader = self._writer = None
        self.connected = False  # watchers still waiting fall back to re-reading
        await self._disconnect()

    async def _disconnect(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        with contextlib.suppress(Exception):
            if pubsub is not None:
                await pubsub.aclose()
        with contextlib.suppress(Exception):
            if client is not None:
                await client.aclose()

    # --- watching -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str, final: bool = False) -> AsyncIterator[Watch]:
        """Subscribe to ``task_id``'s notes (``final``: only its final status) for the
        block's duration; read the task's state only inside the block. Unavailable (503) when
        too many requests already wait."""
        self.check_capacity()
        name = self.channel(task_id, final)
        chan = self._chans.get(name)
        if chan is None:
            chan = self._chans[name] = _Chan(name, own=name.startswith(self._own))
            if chan.own and self.connected:
                chan.ready.set()  # the pattern is confirmed while connected
        watch = Watch(self, chan)
        chan.watchers.add(watch)
        self._watchers += 1
        try:
            if self.connected and not chan.subscribed and not chan.own:
                self._subscribe(chan)
            if self.connected and not chan.ready.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CONFIRM_S):
                        await chan.ready.wait()
            yield watch
        finally:
            self._watchers -= 1
            chan.watchers.discard(watch)
            if not chan.watchers:
                self._release(chan)

    async def until_final(self, task_id: str, wait: float, read: Read) -> dict[str, Any]:
        """``read()`` as soon as the task is final, or after ``wait`` seconds (a long-poll).
        Subscribed before the first read, so no transition slips between read and wait."""
        if wait <= 0:
            return await read()
        deadline = asyncio.get_running_loop().time() + wait
        async with self.watch(task_id) as watch:
            return await settle(watch, deadline, read, await read())

    async def changes(
        self, task_id: str, wait: float, read: Read, heartbeat: float
    ) -> AsyncIterator[dict[str, Any] | None]:
        """``read()``'s view now, then each time its (status, progress, message) changes,
        until a final status or ``wait`` seconds; None after ``heartbeat`` s of quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        last: tuple[Any, ...] | None = None
        async with self.watch(task_id) as watch:
            spoke = loop.time()
            while True:
                view = await read()
                key = (view["status"], view.get("progress"), view.get("message"))
                if key != last:
                    last, spoke = key, loop.time()
                    yield view
                left = deadline - loop.time()
                if view["status"] in TERMINAL_STATUSES or left <= 0:
                    return
                note = await watch.next(min(left, heartbeat))
                if note is None and loop.time() - spoke >= heartbeat:
                    spoke = loop.time()
                    yield None

    def _subscribe(self, chan: _Chan) -> None:
        chan.subscribed = True
        chan.pending += 1
        chan.ready.clear()
        self._commands.put_nowait(("SUBSCRIBE", chan.name))

    def _release(self, chan: _Chan) -> None:
        if chan.subscribed and self.connected:
            chan.subscribed = False
            self._commands.put_nowait(("UNSUBSCRIBE", chan.name))
        if chan.pending == 0 and self._chans.get(chan.name) is chan:
            del self._chans[chan.name]

    def _confirmed(self, name: str) -> None:
        chan = self._chans.get(name)
        if chan is None or chan.pending == 0:
            return
        chan.pending -= 1
        if chan.pending:
            return
        if chan.subscribed:
            chan.ready.set()
            if chan.resync:
                chan.resync = False
                for watch in chan.watchers:
                    watch.push(RESYNC)
        elif not chan.watchers:
            del self._chans[name]

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, name = message["type"], message["channel"]
        if kind in ("message", "pmessage"):
            chan = self._chans.get(name)
            if chan is not None:
                for watch in chan.watchers:
                    watch.push(message["data"])
        elif kind == "subscribe":
            self._confirmed(name)

    # --- the connection -------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._connect()
                delay = 0.05
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("event connection lost (%s); reconnecting", exc)
            await self._down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect(self) -> None:
        self._client = Redis.from_url(
            self._url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),  # reconnects and resubscribes are ours
            client_name=CLIENT_NAME,
        )
        self._pubsub = self._client.pubsub()
        await self._pubsub.psubscribe(self._pattern)  # also keeps the connection subscribed
        async with asyncio.timeout(5):
            while (await self._pubsub.get_message(timeout=1.0) or {}).get("type") != "psubscribe":
                pass
        self._commands = asyncio.Queue()
        self.connected = True
        self._writer = asyncio.create_task(self._write(self._pubsub, self._commands))
        for chan in list(self._chans.values()):
            if chan.watchers and chan.own:
                chan.ready.set()
                for watch in chan.watchers:
                    watch.push(RESYNC)
            elif chan.watchers:
                chan.resync = True
                self._subscribe(chan)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while True:
            message = await self._pubsub.get_message(timeout=PING_S)
            if message is not None:
                heard = loop.time()
                self._dispatch(message)
            elif loop.time() - heard > 3 * PING_S:
                raise ConnectionError(f"no answer for {3 * PING_S:g} s")
            else:
                self._commands.put_nowait(("PING", ""))

    async def _write(self, pubsub: Any, commands: asyncio.Queue[tuple[str, str]]) -> None:
        """Send queued commands in order; a failure drops the connection, so that the
        reader reconnects (and resubscribes)."""
        try:
            await self._send(pubsub, commands)
        except Exception as exc:
            log.warning("event connection write failed (%s)", exc)
            with contextlib.suppress(Exception):
                await pubsub.connection.disconnect()

    @staticmethod
    async def _send(pubsub: Any, commands: asyncio.Queue[tuple[str, str]]) -> None:
        """Consecutive commands of a kind go as one (SUBSCRIBE a b c)."""
        while True:
            batch = [await commands.get()]
            while not commands.empty():
                batch.append(commands.get_nowait())
            run: list[str] = []
            for i, (kind, name) in enumerate(batch):
                run.append(name)
                if i + 1 < len(batch) and batch[i + 1][0] == kind and kind != "PING":
                    continue
                if kind == "SUBSCRIBE":
                    await pubsub.subscribe(*run)
                elif kind == "UNSUBSCRIBE":
                    await pubsub.unsubscribe(*run)
                else:
                    await pubsub.ping()
                run = []

    async def _down(self) -> None:
        """The connection is gone: forget what it had subscribed; watchers re-read."""
        was = self.connected
        self.connected = False
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
            self._writer = None
        for name, chan in list(self._chans.items()):
            chan.pending, chan.subscribed = 0, False
            chan.ready.clear()
            if not chan.watchers:
                del self._chans[name]
            elif was:
                for watch in chan.watchers:
                    watch.push(RESYNC)
        await self._disconnect()
