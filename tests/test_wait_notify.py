"""TaskNotifier, the shared Pub/Sub connection behind long-poll and SSE: wake-ups, bounds,
and what happens when its connection drops (waiters fall back, then it resubscribes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gpuflow.core.errors import Unavailable
from gpuflow.core.notify import CLIENT_NAME, RESYNC, TaskNotifier
from gpuflow.core.tasks import NewTask
from gpuflow.store import Store

from .conftest import Services


@pytest.fixture
async def notifier(redis_url: str, store: Store) -> AsyncIterator[TaskNotifier]:
    hub = TaskNotifier(redis_url, store.settings.namespace, max_watchers=3)
    hub.start()
    try:
        yield hub
    finally:
        await hub.close()


async def until(check: object, what: str) -> None:
    for _ in range(2000):
        if check() if callable(check) else check:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never {what}")


async def numsub(store: Store, task_id: str, final: bool = False) -> int:
    kind = "evf" if final else "ev"
    ((_, n),) = await store.redis.pubsub_numsub(f"{store.settings.namespace}{kind}:{task_id}")
    return int(n)


async def test_a_transition_wakes_its_watchers_only(notifier: TaskNotifier, store: Store) -> None:
    await until(lambda: notifier.connected, "connected")
    async with notifier.watch("t1") as w1, notifier.watch("t1") as w1b, notifier.watch("t2") as w2:
        assert w1.live and w1b.live and w2.live
        assert await numsub(store, "t1") == 1  # one subscription per task, shared
        await store.redis.publish(notifier.channel("t1"), "COMPLETED")
        assert await w1.next(5) == "COMPLETED" and await w1b.next(5) == "COMPLETED"
        assert await w2.next(0.01) is None
    await until(lambda: notifier.watchers == 0, "released")
    for _ in range(200):  # UNSUBSCRIBE went out after the last watcher left
        if await numsub(store, "t1") == 0:
            break
        await asyncio.sleep(0.005)
    assert await numsub(store, "t1") == 0


async def test_the_lua_emit_publishes_each_transition(
    notifier: TaskNotifier, services: Services
) -> None:
    tasks = services.tasks
    task_id = (await tasks.create(NewTask(task_type=1)))["taskId"]
    await until(lambda: notifier.connected, "connected")
    async with notifier.watch(task_id) as w:
        await tasks.cancel(task_id)
        assert await w.next(5) == "CANCELED"


async def test_watchers_are_bounded(notifier: TaskNotifier) -> None:
    async with notifier.watch("a"), notifier.watch("b"), notifier.watch("c"):
        with pytest.raises(Unavailable):
            async with notifier.watch("d"):
                pass
    assert notifier.watchers == 0


async def test_a_dropped_connection_falls_back_then_resubscribes(
    notifier: TaskNotifier, store: Store
) -> None:
    await until(lambda: notifier.connected, "connected")
    async with notifier.watch("t1") as w:
        assert w.live
        await store.redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "pubsub")
        # Told to re-read at once; while not live, next() returns within FALLBACK_S.
        assert await w.next(5) == RESYNC
        # Back: resubscribed, and told to re-read once more (a note may have been missed).
        await until(lambda: w.live, "live again")
        assert await w.next(5) == RESYNC
        assert await numsub(store, "t1") == 1
        await store.redis.publish(notifier.channel("t1"), "FAILED")
        assert await w.next(5) == "FAILED"
    names = await store.redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
    assert CLIENT_NAME in str(names)


async def test_not_connected_waits_fall_back_to_short_waits(store: Store) -> None:
    hub = TaskNotifier("redis://127.0.0.1:1", store.settings.namespace)  # nothing listens
    hub.start()
    try:
        async with hub.watch("t") as w:
            assert not w.live
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await w.next(30) is None
            assert loop.time() - started < 5
    finally:
        await hub.close()


async def test_an_own_task_id_is_watched_without_a_subscribe(
    notifier: TaskNotifier, services: Services, store: Store
) -> None:
    """Create-and-wait's ids are covered by the connection's one pattern: live at once, no
    SUBSCRIBE (nothing to wait for before the create), woken by the scripts' emits of the
    task's end only; a plain watch of the same id in the same process still subscribes and
    hears every step after the creation (the creation itself notes nothing: every route that
    watches a task reads it first, so nobody can watch one that does not exist yet)."""
    await until(lambda: notifier.connected, "connected")
    task_id = notifier.own_task_id()
    assert task_id.startswith("task_") and len(task_id) == len("task_") + 32
    async with notifier.watch(task_id, final=True) as w:
        assert w.live
        assert await numsub(store, task_id, final=True) == 0  # no subscription of its own
        async with notifier.watch(task_id) as steps:
            assert steps.live and await numsub(store, task_id) == 1
            await services.tasks.create(NewTask(task_type=1), task_id=task_id)
            assert await steps.next(0.2) is None
            await services.tasks.cancel(task_id)
            assert await steps.next(5) == "CANCELED"
        assert await w.next(5) == "CANCELED"  # the first note the end's watcher hears
    assert notifier.own_task_id()[:13] == task_id[:13]  # one tag per process
    assert notifier.own_task_id() != task_id


async def test_another_process_watches_an_own_id_the_usual_way(
    notifier: TaskNotifier, redis_url: str, store: Store
) -> None:
    other = TaskNotifier(redis_url, store.settings.namespace)
    other.start()
    try:
        await until(lambda: notifier.connected and other.connected, "connected")
        task_id = notifier.own_task_id()
        mine, theirs = notifier.watch(task_id, final=True), other.watch(task_id, final=True)
        async with mine as mine, theirs as theirs:
            assert mine.live and theirs.live
            assert await numsub(store, task_id, final=True) == 1  # the other's SUBSCRIBE
            await store.redis.publish(notifier.channel(task_id, final=True), "COMPLETED")
            assert await mine.next(5) == "COMPLETED" and await theirs.next(5) == "COMPLETED"
        other_id = other.own_task_id()
        async with notifier.watch("t-any") as unrelated:
            await store.redis.publish(notifier.channel(other_id, final=True), "COMPLETED")
            assert await unrelated.next(0.2) is None
    finally:
        await other.close()


async def test_own_watchers_resync_after_a_dropped_connection(
    notifier: TaskNotifier, store: Store
) -> None:
    await until(lambda: notifier.connected, "connected")
    task_id = notifier.own_task_id()
    async with notifier.watch(task_id, final=True) as w:
        await store.redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "pubsub")
        assert await w.next(5) == RESYNC
        await until(lambda: w.live, "live again")
        assert await w.next(5) == RESYNC  # the pattern is back: re-read once more
        await store.redis.publish(notifier.channel(task_id, final=True), "FAILED")
        assert await w.next(5) == "FAILED"


async def test_the_own_pattern_escapes_the_namespace(redis_url: str, store: Store) -> None:
    """A namespace with glob characters matches only itself, not what the glob would."""
    hub = TaskNotifier(redis_url, "g*[ab]:")
    hub.start()
    try:
        await until(lambda: hub.connected, "connected")
        task_id = hub.own_task_id()
        async with hub.watch(task_id, final=True) as w:
            await store.redis.publish(f"gXYZa:evf:{task_id}", "COMPLETED")  # the glob's match
            assert await w.next(0.2) is None
            await store.redis.publish(hub.channel(task_id, final=True), "COMPLETED")
            assert await w.next(5) == "COMPLETED"
    finally:
        await hub.close()


async def test_an_awaited_task_completes_with_its_view_in_the_note(
    notifier: TaskNotifier, services: Services
) -> None:
    """A task created ``awaited`` carries its fields in its completion note on its final
    channel (what ``Tasks.get`` answers), so the request that awaits it needs no read; the
    step channel has bare statuses; a task not created awaited completes without a final
    note (nobody can await it that way)."""
    from gpuflow.core.gpus import GpuSpec
    from gpuflow.core.models import TaskStatus
    from gpuflow.core.notify import settle
    from gpuflow.core.tasks import view_from_note

    s = services
    await s.gpus.register(GpuSpec("gn", [5], max_concurrent_tasks=2))
    await until(lambda: notifier.connected, "connected")
    awaited, plain = notifier.own_task_id(), notifier.own_task_id()
    w, p = notifier.watch(awaited, final=True), notifier.watch(plain, final=True)
    async with w as w, p as p, notifier.watch(awaited) as steps:
        await s.tasks.create(NewTask(5, '{"in": 1}'), task_id=awaited, awaited=True)
        await s.tasks.create(NewTask(5, "x"), task_id=plain)
        assert len(await s.dispatch.claim("gn")) == 2
        assert await steps.next(5) == "PROCESSING"  # the claim's; the creation notes nothing
        assert await w.next(0.2) is None and await p.next(0) is None  # steps: not for them
        await s.tasks.finish(awaited, TaskStatus.COMPLETED, '{"out": 2}', attempt=1)
        await s.tasks.finish(plain, TaskStatus.COMPLETED, "y", attempt=1)
        note = await w.next(5)
        assert await steps.next(5) == "COMPLETED"  # every step's channel: the bare status
        assert await p.next(0.2) is None
    assert note is not None
    status, _, fields = note.partition("\n")
    assert status == "COMPLETED"
    assert view_from_note(fields) == await s.tasks.get(awaited)
    assert view_from_note(fields)["result"] == '{"out": 2}'

    reads = 0

    async def read() -> dict[str, object]:
        nonlocal reads
        reads += 1
        return await s.tasks.get(awaited)

    async with notifier.watch(awaited) as w:
        w.push(note)  # as the reader delivers it
        loop = asyncio.get_running_loop()
        view = await settle(w, loop.time() + 5, read, view_of=view_from_note)
    assert view["status"] == "COMPLETED" and reads == 0
    async with notifier.watch(awaited) as w:
        w.push("COMPLETED\n[1, 2")  # a note it cannot read: it reads the task instead
        view = await settle(w, loop.time() + 5, read, view_of=view_from_note)
    assert view["status"] == "COMPLETED" and reads == 1


async def test_a_big_result_leaves_the_fields_out_of_the_note(
    notifier: TaskNotifier, services: Services
) -> None:
    """Past 64 KB the completion note is a bare status: the waiter reads the task."""
    from gpuflow.core.gpus import GpuSpec
    from gpuflow.core.models import TaskStatus

    s = services
    await s.gpus.register(GpuSpec("gb", [6]))
    await until(lambda: notifier.connected, "connected")
    task_id = notifier.own_task_id()
    async with notifier.watch(task_id, final=True) as w:
        await s.tasks.create(NewTask(6, "x"), task_id=task_id, awaited=True)
        assert len(await s.dispatch.claim("gb")) == 1
        await s.tasks.finish(task_id, TaskStatus.COMPLETED, "r" * 70_000, attempt=1)
        assert await w.next(5) == "COMPLETED"
