"""Joins without a network: a worker announced mid-request enters the plan (or stays standby
without a rebalance), and one restarted without a goodbye replaces its old run."""

from __future__ import annotations

from conftest import run
from test_discovery import worker

from coordinator.cluster.discovery import MemberTable
from protos.discovery import WorkerAd


async def replanned(membership, seconds: float = 10.0) -> None:
    """Wait (polling) until membership has re-planned at least once, or `seconds` pass."""
    import asyncio

    for _ in range(int(seconds / 0.05)):
        if membership.replans:
            return
        await asyncio.sleep(0.05)


async def join_while_running(s, address: str, prompt: list[int]):
    """Start a 60-token request on `s`, then announce the worker at `address` as w3 (as mDNS
    would) and wait until membership can use it; returns (the request's task, (host, port))."""
    import asyncio

    from coordinator.cluster.cluster import dial
    from coordinator.cluster.discovery import split_address

    membership = s.coordinator.membership
    joiner = await dial(address)
    node_id = joiner.info.id
    await joiner.channel.close()
    running = asyncio.create_task(s.generate(prompt, 60))
    while s.coordinator.engine.scheduler.running == 0:
        await asyncio.sleep(0.005)
    host, port = split_address(address)
    membership._on_seen("w3._shardline._tcp.local.",
                        WorkerAd(id=node_id, cluster="default"), [host], port, "")
    while not membership.table.usable()[2:]:
        await asyncio.sleep(0.01)
    return running, (host, port)


def test_a_join_mid_request_enters_the_plan_and_the_request_ends_exact(model_dir, workers):
    """A worker announced mid-request enters the plan (docs/weights.md, "Re-plans move only
    what changed"); the request goes on on the new plan, token for token."""
    import asyncio

    from conftest import Serving, reference_tokens

    from coordinator.demo import ModelSpec

    path = model_dir(ModelSpec(family="llama"))
    prompt = [1, 5, 9, 200, 33, 4]
    expected = reference_tokens(path, prompt, 60)

    async def scenario():
        async with Serving(path, workers[:2], context=256) as s:
            membership = s.coordinator.membership
            membership.settle = 0.1
            running, (host, port) = await join_while_running(s, workers[2], prompt)
            tokens, _, _ = await running
            await replanned(membership)
            state = s.coordinator.cluster.state()
            again, _, _ = await s.generate(prompt, 60)
            # w3 re-announced with another process's TXT (what a resolver returns when a
            # copy claims w3's instance name): w3 is re-dialled, and stays the plan's worker
            plan = list(s.coordinator.cluster.workers)
            membership._on_seen("w3._shardline._tcp.local.",
                                WorkerAd(id="feedfacefeedface", cluster="default"), [host],
                                port, "")
            member = membership.table.members["w3._shardline._tcp.local."]
            while member.worker is None:
                await asyncio.sleep(0.01)
            assert membership.due() == ""  # no re-plan is coming for the re-dialled w3
            assert s.coordinator.cluster.workers == plan and member.worker is plan[2]
            assert s.coordinator.cluster.pipeline.broken is None
            third, _, _ = await s.generate(prompt, 60)
            return tokens, again + third, membership.replans, state

    tokens, again, replans, state = run(scenario())
    assert tokens == expected and again == expected * 2 and replans == 1
    assert [(w.name, w.status) for w in state.workers] == \
        [("w1", "serving"), ("w2", "serving"), ("w3", "serving")]
    assert [w.layer_end - w.layer_start for w in state.workers] == [1, 2, 3]  # 1, 2, 3 GiB


def test_a_join_with_no_rebalance_stays_standby(model_dir, workers):
    """--no-rebalance: a worker announced mid-request stays on standby after the cluster goes
    idle (no re-plan), is listed and counted as standby, and is pulled in only by the re-plan
    that losing a plan worker forces."""
    import asyncio
    import json
    import urllib.request

    from conftest import Serving, reference_tokens

    from coordinator.cluster.discovery import LEFT
    from coordinator.demo import ModelSpec

    path = model_dir(ModelSpec(family="llama"))
    prompt = [1, 5, 9, 200, 33, 4]
    expected = reference_tokens(path, prompt, 60)

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    async def scenario():
        async with Serving(path, workers[:2], context=256, rebalance=False) as s:
            membership = s.coordinator.membership
            membership.settle = 0.1
            base = f"http://127.0.0.1:{s.coordinator.http_port}"
            running, (host, port) = await join_while_running(s, workers[2], prompt)
            tokens, _, _ = await running
            idle = s.coordinator.engine.scheduler
            assert idle.running == 0 and idle.waiting == 0
            # with rebalancing a re-plan would be due now (and start after the 0.1 s settle)
            assert membership.due() == ""
            standby = s.coordinator.cluster.state()
            again, _, _ = await s.generate(prompt, 60)
            assert membership.due() == ""
            replans_idle = membership.replans
            sd = json.loads(await asyncio.to_thread(get, f"{base}/sd/workers"))
            metrics = await asyncio.to_thread(get, f"{base}/metrics")
            # a plan worker lost: the re-plan it forces takes the standby joiner in
            w2 = membership.table.member_of(s.coordinator.cluster.workers[1])
            membership.table.left(w2.key, LEFT)
            membership._changed()
            await replanned(membership)
            after_loss = s.coordinator.cluster.state()
            third, _, _ = await s.generate(prompt, 60)
            return (tokens, again, third, replans_idle, membership.replans, standby, sd,
                    metrics, after_loss)

    tokens, again, third, replans_idle, replans, standby, sd, metrics, after_loss = \
        run(scenario())
    assert tokens == expected and again == expected and third == expected
    assert replans_idle == 0
    assert [(w.name, w.status) for w in standby.workers] == \
        [("w1", "serving"), ("w2", "serving"), ("w3", "standby")]
    assert standby.workers[2].layer_end == standby.workers[2].layer_start == 0
    assert [t["labels"]["worker"] for t in sd] == ["w1", "w2", "w3"]
    assert "layers" not in sd[2]["labels"]
    assert 'shardline_workers{state="standby"} 1.0' in metrics
    assert 'shardline_workers{state="serving"} 2.0' in metrics
    assert 'shardline_replans_total{reason="worker_joined"} 0.0' in metrics
    assert replans == 1
    rows = {w.name: (w.status, w.layer_end - w.layer_start) for w in after_loss.workers}
    assert rows["w1"][0] == rows["w3"][0] == "serving" and rows["w2"][0] == LEFT
    assert rows["w1"][1] + rows["w3"][1] == 6 and rows["w3"][1] > 0


def test_a_worker_restarted_without_goodbye_replaces_its_old_run():
    table = MemberTable("lab")
    old, _ = table.saw("w1@a-111111.local.", WorkerAd(id="n1", cluster="lab"), ["10.0.0.1"],
                       50061, instance="w1._shardline._tcp.local.")
    table.identified(old, worker("10.0.0.1:50061", "n1"))
    # the new run announces before the old one's health checks have failed: same endpoint
    new, dial = table.saw("w1@a-222222.local.", WorkerAd(id="n1", cluster="lab"),
                          ["10.0.0.1"], 50061, instance="w1._shardline._tcp.local.")
    assert not dial and new.alias_of == old.key and new.name == "w1"
    assert len(table.claiming("w1._shardline._tcp.local.")) == 2
    old.gone = "unreachable"
    assert table.recheck_duplicates() == [new] and not new.alias_of
    table.identified(new, worker("10.0.0.1:50061", "n1"))
    assert [m.key for m in table.usable()] == [new.key]
    assert [r.status for r in table.rows()] == ["standby"]  # the old run is not listed


def test_a_late_copy_of_a_goodbye_workers_announcement_does_not_make_it_unreachable():
    """mDNS can deliver an announcement of a worker after its goodbye: dialling it then finds
    nobody, and the worker stays left (it said so), not unreachable."""
    import asyncio
    import socket

    from coordinator.cluster.discovery import LEFT, UNREACHABLE
    from coordinator.cluster.membership import Membership

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = "w9._shardline._tcp.local."

    async def scenario():
        m = Membership(cluster="lab", discover=False, progress=lambda s: None)
        states = []
        try:
            for event in ("seen", "gone", "seen again"):
                if event == "gone":
                    m._on_gone(name)
                else:
                    m._on_seen(name, None, ["127.0.0.1"], port, "")
                member = m.table.members[name]
                deadline = asyncio.get_running_loop().time() + 10
                while not member.gone:  # the dial gives up on the closed port
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.01)
                states.append(member.gone)
        finally:
            await m.close()
        return states

    assert run(scenario()) == [UNREACHABLE, LEFT, LEFT]
