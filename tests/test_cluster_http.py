"""The HTTP tier of a cluster, with real processes: any node's HTTP API (in-process or
its HTTP workers) serves every pool, whichever node owns it, by sending the request to
the pool's owner (``VIA`` over the client library, authenticated with the cluster's
secret); across an owner's death; ``GET /api/cluster`` shows the members. And what
an outsider cannot do with that path."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos.server import free_port
from tests.dbutil import query
from tests.strategies import valid_user_ids
from tests.test_cluster import Node, _stop, balanced, eventually, owner, text
from tokenpool._client.via import encode_result, result_of
from tokenpool._cluster.peers import Followed
from tokenpool._commands.leases import Granted
from tokenpool._commands.tokens import ChunkedItems, TokenChunks, TokenList
from tokenpool._errors import UnavailableError, UnreachableError
from tokenpool._model import Lease


@contextmanager
def cluster(url: str, count: int, *args: str) -> Iterator[list[Node]]:
    """``count`` nodes on one schema, each with an HTTP port of its own, once the slots
    are spread evenly over them."""
    nodes = [
        Node(f"n{i}", url, "--http-port", str(free_port()), *args) for i in range(1, count + 1)
    ]
    with ExitStack() as stack:
        for node in nodes:
            node.start()
            stack.callback(_stop, node)
        stack.callback(_close_clients)
        eventually(lambda: balanced(nodes), 30, "slots spread evenly over the nodes")
        yield nodes


_clients: list[httpx.Client] = []


def _close_clients() -> None:
    while _clients:
        _clients.pop().close()


def held(node: Node, pool: str, user: str) -> str:
    """The id of ``user``'s lease in ``pool``, asked of ``node`` over RESP."""
    with node.client() as r:
        reply = r.execute_command("TP.LEASE", pool, user)
    if isinstance(reply, dict):
        return text(reply[b"id"])
    flat = [text(x) for x in reply]
    return dict(zip(flat[::2], flat[1::2], strict=True))["id"]


def activate(node: Node, pool: str, user: str) -> None:
    with node.client() as r:
        r.execute_command("TP.ACTIVATE", pool, user)


def first_event_after(node: Node, pool: str, act: Callable[[], None]) -> list[dict[str, Any]]:
    """The first event of ``pool``'s stream on ``node``'s HTTP, opened before ``act()``."""
    seen: list[dict[str, Any]] = []

    def follow() -> None:
        with http(node) as reader, reader.stream("GET", f"/api/pools/{pool}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                    return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.5)  # the stream is open (following the pool on its owner)
    act()
    thread.join(15)
    return seen


def http(node: Node) -> httpx.Client:
    process = node.process
    assert process is not None and process.http_port is not None
    client = httpx.Client(base_url=f"http://127.0.0.1:{process.http_port}", timeout=30)
    _clients.append(client)  # closed with the cluster
    return client


def names_owned(nodes: list[Node], count: int) -> list[str]:
    """``count`` pool names spread over every node (by their slots' owners)."""
    out: list[str] = []
    by_node: dict[int, int] = {}
    i = 0
    while len(out) < count:
        name = f"h{i}"
        i += 1
        port = owner(nodes, name).port
        if by_node.get(port, 0) < count // len(nodes) + 1:
            by_node[port] = by_node.get(port, 0) + 1
            out.append(name)
    return out


def test_every_node_serves_every_pool_over_http(pg_url: str) -> None:
    with cluster(pg_url, 3, "--durability", "sync") as nodes:
        clients = [http(n) for n in nodes]
        names = names_owned(nodes, 9)
        assert len({owner(nodes, name).port for name in names}) == 3
        for i, name in enumerate(names):  # created through any node: served by its owner
            made = clients[i % 3].post("/api/pools", json={"name": name, "size": 2, "ttl": 600})
            assert made.status_code == 200, made.text
        for client in clients:
            listed = {p["name"] for p in client.get("/api/pools").json()["data"]}
            assert set(names) <= listed
        for name in names:
            home = owner(nodes, name)
            granted = [
                c.post(f"/api/pools/{name}/tokens/activate", json={"user_id": "alice"})
                for c in clients
            ]
            assert [g.status_code for g in granted] == [200, 200, 200]
            leases = [g.json()["data"] for g in granted]
            assert len({(d["id"], d["token_id"], d["fence"]) for d in leases}) == 1  # one lease
            assert held(home, name, "alice") == leases[0]["id"]  # the owner holds it
            for c in clients:  # every read, and the pool's settings, from any node
                got = c.get(f"/api/pools/{name}/users/alice/lease").json()["data"]
                assert got["id"] == leases[0]["id"]
                token = c.get(f"/api/pools/{name}/tokens/{got['token_id']}").json()["data"]
                assert token["current_user_id"] == "alice"
                assert c.get(f"/api/pools/{name}").json()["data"]["stats"]["active"] == 1
        # a refusal on the owner comes back with its code and status
        full = names[0]
        for user in ("bob", "carol"):
            clients[1].post(f"/api/pools/{full}/tokens/activate", json={"user_id": user})
        released = clients[2].post(
            f"/api/pools/{full}/tokens/00000000-0000-0000-0000-000000000000/release", json={}
        )
        assert released.status_code == 404
        assert released.json()["error"]["code"] == "UNKNOWN"
        # the cluster as every node sees it
        for c in clients:
            view = c.get("/api/cluster").json()["data"]
            assert view["enabled"] is True and view["state"] == "ok"
            assert {m["id"] for m in view["members"]} == {"n1", "n2", "n3"}
            assert sum(m["slots"] for m in view["members"]) == 16384
            assert all(m["live"] for m in view["members"])
        assert (
            sum(
                c.get("/api/cluster").json()["data"]["node"]["http_requests_forwarded"]
                for c in clients
            )
            > 0
        )


def test_events_of_another_node_s_pool_stream_over_http(pg_url: str) -> None:
    with cluster(pg_url, 2) as nodes:
        name = next(n for n in (f"e{i}" for i in range(100)) if owner(nodes, n) is nodes[1])
        client = http(nodes[0])
        assert (
            client.post("/api/pools", json={"name": name, "size": 2, "ttl": 600}).status_code == 200
        )
        seen = first_event_after(nodes[0], name, lambda: activate(nodes[1], name, "dave"))
        assert seen and seen[0]["kind"] == "granted" and seen[0]["user_id"] == "dave"


def test_a_request_through_another_node_is_served_across_its_owner_s_death(
    pg_url: str,
) -> None:
    with cluster(pg_url, 2, "--durability", "sync") as nodes:
        name = next(n for n in (f"k{i}" for i in range(100)) if owner(nodes, n) is nodes[1])
        client = http(nodes[0])
        assert (
            client.post("/api/pools", json={"name": name, "size": 2, "ttl": 600}).status_code == 200
        )
        granted = client.post(f"/api/pools/{name}/tokens/activate", json={"user_id": "erin"})
        lease = granted.json()["data"]
        assert nodes[1].process is not None
        nodes[1].process.kill()  # SIGKILL
        # asked at once: the request waits for the slot's next owner (this node)
        again = client.get(f"/api/pools/{name}/users/erin/lease")
        assert again.status_code == 200, again.text
        assert (again.json()["data"]["id"], again.json()["data"]["fence"]) == (
            lease["id"],
            lease["fence"],
        )
        retried = client.post(f"/api/pools/{name}/tokens/activate", json={"user_id": "erin"})
        assert retried.json()["data"]["id"] == lease["id"]  # the same lease, same pool


def test_http_workers_reach_every_node_s_pools(pg_url: str) -> None:
    with cluster(pg_url, 2, "--http-workers", "1") as nodes:
        names = names_owned(nodes, 4)
        client = http(nodes[0])
        for name in names:
            made = client.post("/api/pools", json={"name": name, "size": 2, "ttl": 600})
            assert made.status_code == 200, made.text
            granted = client.post(f"/api/pools/{name}/tokens/activate", json={"user_id": "fay"})
            assert granted.status_code == 200, granted.text
            assert held(owner(nodes, name), name, "fay") == granted.json()["data"]["id"]
        listed = {p["name"] for p in client.get("/api/pools").json()["data"]}
        assert set(names) <= listed
        assert client.get("/api/cluster").json()["data"]["enabled"] is True
        # events of a pool the worker's own server does not serve, followed on its owner
        far = next(n for n in names if owner(nodes, n) is nodes[1])
        seen = first_event_after(nodes[0], far, lambda: activate(nodes[1], far, "gus"))
        assert seen and seen[0]["user_id"] == "gus"
        # that pool's listing and a token's history: the owner's chunks, decoded and checked
        # by the node in between, chunked again for its worker
        tokens = client.get(f"/api/pools/{far}/tokens").json()["data"]
        assert 2 == len(tokens)
        assert {"fay", "gus"} == {t["current_user_id"] for t in tokens}
        token = tokens[0]["id"]
        page = client.get(f"/api/pools/{far}/tokens/{token}/history", params={"limit": 2_000})
        assert 200 == page.status_code and token == page.json()["data"]["token_id"]


def test_only_a_node_with_the_cluster_s_secret_may_send_via(pg_url: str) -> None:
    with cluster(pg_url, 2) as nodes:
        name = next(n for n in (f"v{i}" for i in range(100)) if owner(nodes, n) is nodes[0])
        via = ("VIA", "1.2.3.4:5", "", "TP.ACTIVATE", name, "x")
        with nodes[0].client() as r:
            r.execute_command("POOL", "CREATE", name, "SIZE", "2", "TTL", "600")
            with pytest.raises(redis.exceptions.NoPermissionError, match="VIA is for"):
                r.execute_command(*via)
            with pytest.raises(redis.AuthenticationError):
                r.execute_command("AUTH", "tokenpool-node", "not-the-secret")
            # HELLO's AUTH is AUTH: the same refusal (it was an ERR about passwords)
            with pytest.raises(redis.AuthenticationError):
                r.execute_command("HELLO", "2", "AUTH", "tokenpool-node", "not-the-secret")
            with pytest.raises(redis.exceptions.NoPermissionError):  # still nobody
                r.execute_command(*via)
            assert r.execute_command("TP.LEASE", name, "x") is None  # nothing was granted
            ((secret,),) = query(pg_url, "SELECT secret FROM cluster_secret")
            assert len(secret) >= 32
            hello = r.execute_command("HELLO", "2", "AUTH", "tokenpool-node", secret)
            assert b"tokenpool" in hello  # HELLO's AUTH takes the node's secret too
            result_of(r.execute_command(*via))  # the cluster's secret opens it
            # ...and nothing else: a node's session is no password for the pools
            for command in (
                ("TP.LEASE", name, "x"),
                ("POOL", "DROP", name),
                ("CONFIG", "GET", "*"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError, match="cluster node"):
                    r.execute_command(*command)
            assert r.execute_command("PING") in (b"PONG", True)
        with nodes[0].client() as r:
            assert r.execute_command("TP.LEASE", name, "x") is not None


def test_event_streams_followed_on_one_node_are_bounded() -> None:
    follows = Followed(limit=2)
    with follows.held("a:1"), follows.held("a:1"):
        with pytest.raises(UnavailableError, match="2 event streams"):
            follows.check("a:1")
        follows.check("b:1")  # another node has its own bound
    follows.check("a:1")  # given back when the streams end
    assert follows.open == {}


def test_a_forged_via_reply_makes_nothing_run() -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("touch /tmp/tokenpool-pwned",))

    forged = base64.b64encode(pickle.dumps(Boom()))
    with pytest.raises(UnreachableError, match="may not name"):
        result_of(forged)
    assert not os.path.exists("/tmp/tokenpool-pwned")
    with pytest.raises(UnreachableError):
        result_of(b"not base64 at all!")
    # a class of the package whose making does work is refused too
    from tokenpool._store.analytics import SqliteAnalyst

    with pytest.raises(UnreachableError, match="SqliteAnalyst"):
        result_of(base64.b64encode(pickle.dumps(SqliteAnalyst.__new__(SqliteAnalyst))))
    # what a real reply carries comes back whole
    now = datetime.now(UTC)
    lease = Lease("l", "t", "u", 7, now, now)
    assert result_of(encode_result([lease, None, {"a": (1, 2.5)}])) == [
        lease,
        None,
        {"a": (1, 2.5)},
    ]


def test_a_forged_via_reply_imports_nothing_and_asks_for_no_memory() -> None:
    # naming a module imports it: tokenpool.__main__ would run the CLI (SystemExit)
    main = b"\x80\x04ctokenpool.__main__\nX\n."
    with pytest.raises(UnreachableError, match=r"may not name tokenpool\.__main__"):
        result_of(base64.b64encode(main))
    assert "tokenpool.__main__" not in sys.modules
    # 40 bytes asking for bytearray(2**31 - 1), and the like
    for name in (b"bytearray", b"bytes", b"range"):
        bomb = b"\x80\x04cbuiltins\n" + name + b"\nJ\xff\xff\xff\x7f\x85R."
        with pytest.raises(UnreachableError, match="may not name builtins"):
            result_of(base64.b64encode(bomb))


def test_another_node_s_reply_may_not_set_a_class_s_attributes() -> None:
    from tokenpool._server.session import Pending

    # GLOBAL Pending; state (None, {"request": "forged"}); BUILD: setattr on the class
    forged = (
        b"\x80\x04ctokenpool._server.session\nPending\n"
        b"N}X\x07\x00\x00\x00requestX\x06\x00\x00\x00forgeds\x86b."
    )
    with pytest.raises(UnreachableError, match="may not set a class's attributes"):
        result_of(base64.b64encode(forged), remote=True)
    assert Pending(1, 2, 3).request == 1  # every named tuple of the process unchanged
    now = datetime.now(UTC)
    whole = [Lease("l", "t", "u", 7, now, now), None, {"a": (1, 2.5)}]
    assert result_of(encode_result(whole), remote=True) == whole


def test_the_dashboard_shows_the_cluster_and_every_node_s_pools(pg_url: str) -> None:
    """A real chromium on one node's dashboard: the cluster's members, their health and
    slots; a pool another node serves, drawn with its holder; a killed node shown failed."""
    from tests.test_dashboard import CHROMIUM, _browser_or_skip

    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with cluster(pg_url, 2) as nodes:
        far = next(n for n in (f"d{i}" for i in range(100)) if owner(nodes, n) is nodes[1])
        client = http(nodes[0])
        assert (
            client.post("/api/pools", json={"name": far, "size": 3, "ttl": 600}).status_code == 200
        )
        with nodes[1].client() as r:
            r.execute_command("TP.ACTIVATE", far, "hana")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(str(client.base_url) + "/")
                page.wait_for_selector('section.cluster tr[data-node="n2"]', timeout=15_000)
                assert page.inner_text("section.cluster [data-state]") == "ok"
                shown = {
                    node: int(
                        page.inner_text(f'section.cluster tr[data-node="{node}"] [data-slots]')
                    )
                    for node in ("n1", "n2")
                }
                assert shown == {"n1": 8192, "n2": 8192}
                page.wait_for_function(
                    "document.body.innerText.includes('hana')"
                    f" && document.body.innerText.includes('{far}')",
                    timeout=15_000,
                )
                os.kill(nodes[1].pid, signal.SIGSTOP)  # its lease runs out: failed, then taken over
                try:
                    page.wait_for_function(
                        "document.querySelector('section.cluster tr[data-node=\"n2\"]')"
                        ".innerText.includes('failed')",
                        timeout=15_000,
                    )
                finally:
                    os.kill(nodes[1].pid, signal.SIGCONT)
            finally:
                browser.close()


def test_waiters_on_another_node_s_pool_do_not_stall_other_requests(pg_url: str) -> None:
    """Activations waiting on a full pool of another node hold a connection to it each:
    they have connections of their own, so the other requests through that node still
    answer at once (they shared eight, which twelve waiters took for 20 s)."""
    with cluster(pg_url, 2) as nodes:
        far = [n for n in (f"w{i}" for i in range(200)) if owner(nodes, n) is nodes[1]][:2]
        full, other = far
        client = http(nodes[0])
        for name, policy in ((full, "wait"), (other, "evict")):
            made = client.post(
                "/api/pools", json={"name": name, "size": 1, "ttl": 600, "when_full": policy}
            )
            assert made.status_code == 200, made.text
        activate(nodes[1], full, "holder")
        answers: list[int] = []

        def wait(i: int) -> None:
            with http(nodes[0]) as c:
                answers.append(
                    c.post(
                        f"/api/pools/{full}/tokens/activate",
                        json={"user_id": f"waiter{i}", "wait": 20},
                    ).status_code
                )

        threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # every waiter is waiting on node 2, through node 1
        with httpx.Client(base_url=str(client.base_url), timeout=5) as quick:
            for _ in range(3):
                got = quick.post(f"/api/pools/{other}/tokens/activate", json={"user_id": "z"})
                assert got.status_code == 200, got.text
        with nodes[1].client() as r:
            r.execute_command("TP.CLEAR", full)  # the waiters are granted one by one
        for t in threads:
            t.join(30)
        assert answers.count(200) >= 1 and len(answers) == 12


def test_a_waiter_through_a_worker_that_hangs_up_is_never_granted(pg_url: str) -> None:
    """An HTTP worker's activation that waits on another node's pool: the worker's
    server sends it on; when the HTTP client hangs up the wait is given up all the way
    to the owner, and nothing is granted to nobody (as on the node's own pools)."""
    with cluster(pg_url, 2, "--http-workers", "1") as nodes:
        far = next(n for n in (f"g{i}" for i in range(200)) if owner(nodes, n) is nodes[1])
        client = http(nodes[0])
        made = client.post(
            "/api/pools", json={"name": far, "size": 1, "ttl": 600, "when_full": "wait"}
        )
        assert made.status_code == 200, made.text
        activate(nodes[1], far, "holder")
        with (
            httpx.Client(base_url=str(client.base_url), timeout=1.5) as impatient,
            pytest.raises(httpx.ReadTimeout),
        ):
            impatient.post(
                f"/api/pools/{far}/tokens/activate", json={"user_id": "gone", "wait": 20}
            )
        time.sleep(1.0)  # the hang-up has reached the owner
        with nodes[1].client() as r:
            r.execute_command("TP.CLEAR", far)
            time.sleep(1.0)
            assert r.execute_command("TP.LEASE", far, "gone") is None


def test_a_node_stopping_answers_its_requests_sent_on_503_not_500(pg_url: str) -> None:
    """SIGTERM to a node with an activation waiting on another node's pool: the
    connections to the other nodes close, the activation (safe to repeat) is not sent
    again through them, and its client is answered 503, not a 500."""
    with cluster(pg_url, 2) as nodes:
        far = next(n for n in (f"t{i}" for i in range(200)) if owner(nodes, n) is nodes[1])
        with http(nodes[0]) as client:
            made = client.post(
                "/api/pools", json={"name": far, "size": 1, "ttl": 600, "when_full": "wait"}
            )
            assert made.status_code == 200, made.text
        activate(nodes[1], far, "holder")
        answers: list[httpx.Response] = []

        def wait() -> None:
            with http(nodes[0]) as c:
                answers.append(
                    c.post(f"/api/pools/{far}/tokens/activate", json={"user_id": "w", "wait": 20})
                )

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(1.5)  # waiting on node 2, through node 1
        process = nodes[0].process
        assert process is not None
        process.stop()
        thread.join(15)
        assert [a.status_code for a in answers] == [503], [a.text for a in answers]


def test_a_request_through_another_node_is_served_across_its_owner_s_pause(
    pg_url: str,
) -> None:
    """The pool's owner paused (SIGSTOP: its connections open but nothing answers):
    once its lease runs out and its slot moves, the request waiting on it is asked of
    the next owner, within the wait for an owner, rather than after the client
    library's timeouts (10 s, twice) and a 503."""
    with cluster(pg_url, 2) as nodes:
        far = next(n for n in (f"s{i}" for i in range(200)) if owner(nodes, n) is nodes[1])
        with http(nodes[0]) as client:
            made = client.post("/api/pools", json={"name": far, "size": 2, "ttl": 600})
            assert made.status_code == 200, made.text
            assert client.get(f"/api/pools/{far}").status_code == 200  # connections open
            os.kill(nodes[1].pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                listed = client.get("/api/pools")  # the paused node is left out, in time
                listing = time.monotonic() - started
                started = time.monotonic()
                got = client.get(f"/api/pools/{far}")
                took = time.monotonic() - started
            finally:
                os.kill(nodes[1].pid, signal.SIGCONT)
        assert listed.status_code == 200, listed.text
        assert listing < 7, listing
        assert got.status_code == 200, got.text
        assert took < 8, took


def test_another_node_s_refusal_of_a_listing_is_its_status_not_a_500(pg_url: str) -> None:
    """GET /api/pools asks every node for its pools: one that refuses (its rate limit
    for that client) is answered with its code (429), not a 500 out of a task group."""
    with cluster(pg_url, 2, "--rate-limit", "1", "--rate-limit-burst", "500") as nodes:
        codes: list[int] = []
        with http(nodes[0]) as client:
            while 429 not in codes and len(codes) < 2000:
                got = client.get("/api/pools")
                assert got.status_code in (200, 429), got.text
                codes.append(got.status_code)
        assert 429 in codes, codes


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(0, 40),
    size=st.integers(1, 9),
    index=st.integers(-45, 45),
    start=st.none() | st.integers(-45, 45),
    stop=st.none() | st.integers(-45, 45),
    step=st.none() | st.sampled_from([1, 2, -1]),
)
def test_chunked_items_read_as_the_list_they_carry(
    length: int, size: int, index: int, start: int | None, stop: int | None, step: int | None
) -> None:
    """A listing's pairs in chunks of ``size``, decoded as read: length, iteration,
    an index and any slice are a plain list's."""
    pairs = [
        (f"t{n}", None if n % 3 else (n, f"l{n}", 1, f"u{n}", 2, 3, 4, 0)) for n in range(length)
    ]
    chunks = [pickle.dumps(pairs[i : i + size]) for i in range(0, length, size)]
    items = ChunkedItems(TokenChunks(chunks, length, size), pickle.loads)
    assert len(pairs) == len(items)
    assert pairs == list(items)
    assert pairs[start:stop:step] == items[start:stop:step]
    if -length <= index < length:
        assert pairs[index] == items[index]
    else:
        with pytest.raises(IndexError):
            items[index]


def test_a_token_listing_crosses_via_in_chunks_and_reads_back_whole() -> None:
    """The server pickles a listing of 2,500 tokens a chunk per turn of its loop; its own
    worker reads it a chunk at a time, another node decodes and checks it at once, and a
    chunk naming what a reply may not is refused as a whole reply is."""
    from tokenpool._server.workers import CHUNK, via_reply

    ids = {slot: str(uuid.UUID(int=slot)) for slot in range(2_500)}
    pairs = [
        (slot, None if slot % 2 else (slot, f"l{slot}", 1, "u", 2, 3, slot, 0)) for slot in ids
    ]
    listed = TokenList(pairs, ids.__getitem__, 7)
    reply = trio.run(via_reply, listed)
    expected = [listed.info(item) for item in listed.items]
    for trusted, remote in ((True, False), (False, False), (False, True)):
        got = result_of(reply, own_server=trusted, remote=remote)
        assert (type(got.items) is ChunkedItems) == trusted
        assert expected == [got.info(item) for item in got.items]
        assert 7 == got.cursor
    wire = pickle.loads(base64.b64decode(reply))
    assert [CHUNK, CHUNK, 500] == [len(pickle.loads(c)) for c in wire.items.chunks]

    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("touch /tmp/tokenpool-pwned",))

    forged = TokenList(TokenChunks([pickle.dumps([("t", Boom())])], 1, CHUNK), str, None)
    with pytest.raises(UnreachableError, match="may not name"):
        result_of(encode_result(forged), remote=True)
    assert not os.path.exists("/tmp/tokenpool-pwned")


def test_a_long_history_page_crosses_via_in_chunks_and_reads_back_whole() -> None:
    """A history page of 2,500 usages is pickled a chunk per turn of the server's loop
    and read back as the same page (its cursor too), by every kind of reader; a short
    page crosses as it is."""
    from tokenpool._commands.history import PageChunks
    from tokenpool._model import Page, Usage
    from tokenpool._server.workers import CHUNK, via_reply

    now = datetime.now(UTC)
    usages = [Usage(f"l{n}", "t", f"u{n}", now, now, "evicted", n + 1, n) for n in range(2_500)]
    for page in (Page(usages, 42), Page(usages[:10], None)):
        reply = trio.run(via_reply, page)
        wire = pickle.loads(base64.b64decode(reply))
        assert (type(wire) is PageChunks) == (len(page) > CHUNK)
        for trusted, remote in ((True, False), (False, False), (False, True)):
            got = result_of(reply, own_server=trusted, remote=remote)
            assert type(got) is Page
            assert list(page) == list(got)
            assert page.next_before == got.next_before


@given(
    kind=st.integers(0, 9),
    slot=st.integers(0, 2**31),
    user=valid_user_ids,
    fence=st.integers(0, 2**62),
    start=st.integers(-(2**62), 2**62),
    ttl=st.integers(0, 2**40),
    revision=st.none() | st.integers(0, 2**62),
    remote=st.booleans(),
)
def test_a_granted_lease_crosses_via_as_a_line_and_back(
    kind: int,
    slot: int,
    user: str,
    fence: int,
    start: int,
    ttl: int,
    revision: int | None,
    remote: bool,
) -> None:
    """An activation's result (the hot path of HTTP workers) is a line of its fields, not
    a pickle, and reads back equal, from the worker's own server and from a node."""
    lease = (kind, str(uuid.uuid4()), slot, user, fence, start, start + ttl, fence)
    granted = Granted(lease, str(uuid.uuid4()), revision)
    line = encode_result(granted)
    assert not line.startswith(b"gAS")  # not a pickle
    assert granted == result_of(line, own_server=not remote, remote=remote)
    assert granted == result_of(line.decode())  # as hiredis gives it


@pytest.mark.parametrize(
    "line",
    [
        "G\x1f1\x1fl\x1f2",
        "G\x1fx\x1fl\x1f2\x1f3\x1f4\x1f5\x1f6\x1ft\x1f\x1fu",
        "G\x1f" + "\x1f" * 10,
    ],
)
def test_a_malformed_granted_line_is_refused(line: str) -> None:
    with pytest.raises(UnreachableError, match="not a result"):
        result_of(line, remote=True)
