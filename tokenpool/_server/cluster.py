"""``CLUSTER``: Redis Cluster's view of the nodes and their slots, in Redis's shapes, so
``redis-cli -c`` and cluster clients (redis-py's ``RedisCluster``) route each command
to its pool's owner. Without ``--node-id`` every subcommand answers, as a Redis with
cluster support disabled does, that cluster mode is off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._client.address import host_port
from .._cluster.slots import SLOTS, key_slot
from .._resp import OK, Error
from .session import Action, Planner, Session, command

if TYPE_CHECKING:
    from .._cluster.node import ClusterNode, NodeView
    from .._cluster.peers import Peers

OFF = Error("ERR", "This instance has cluster support disabled (start it with --node-id)")


def _slots(node: ClusterNode) -> list[Any]:
    """Every owned range, a failed owner's too (as Redis lists a failed master's until
    its failover): clients keep a map that covers the slots, and a command sent to a
    node that cannot answer is retried on the map read after the takeover."""
    out: list[Any] = []
    for view in node.nodes():
        host, port = host_port(view.address)
        for first, last in view.ranges:
            out.append([first, last, [host, port, view.id]])
    out.sort(key=lambda entry: entry[0])
    return out


def _shards(node: ClusterNode) -> list[Any]:
    out: list[Any] = []
    for view in node.nodes():
        host, port = host_port(view.address)
        out.append(
            {
                "slots": [bound for run in view.ranges for bound in run],
                "nodes": [
                    {
                        "id": view.id,
                        "port": port,
                        "ip": host,
                        "endpoint": host,
                        "role": "master",
                        "replication-offset": 0,
                        "health": "online" if view.live else "failed",
                    }
                ],
            }
        )
    return out


def _flags(view: NodeView) -> str:
    flags = ["myself"] if view.myself else []
    flags.append("master")
    if not view.live:
        flags.append("fail")
    return ",".join(flags)


def _nodes(node: ClusterNode) -> str:
    lines = []
    for view in node.nodes():
        host, port = host_port(view.address)
        epoch = node.top_epoch if view.myself else 0
        ranges = " ".join(str(a) if a == b else f"{a}-{b}" for a, b in view.ranges)
        link = "connected" if view.live else "disconnected"
        lines.append(
            f"{view.id} {host}:{port}@{port + 10000} {_flags(view)} - 0"
            f" {int(view.heartbeat_age * 1000)} {epoch} {link}" + (f" {ranges}" if ranges else "")
        )
    return "".join(line + "\n" for line in lines)


def info_fields(node: ClusterNode | None) -> dict[str, object]:
    """INFO's cluster section (``cluster_enabled:0`` without cluster mode, as Redis)."""
    return {"cluster_enabled": 0} if node is None else _fields(node)


def cluster_json(peers: Peers | None) -> dict[str, object]:
    """``GET /api/cluster`` and the dashboard's view: this node, and every member with
    its address, state, health and slots (``{"enabled": false}`` without cluster mode:
    no ``peers``)."""
    if peers is None:
        return {"enabled": False}
    node = peers.node
    fields = _fields(node)
    return {
        "enabled": True,
        "state": fields["cluster_state"],
        "node": {
            "id": node.id,
            "state": fields["tokenpool_node_state"],
            "lease_valid": node.valid(),
            "slots_owned": len(node.owned),
            "slots_served": len(node.serving),
            "pools_served": len(node.pools.names()),
            "epoch": node.top_epoch,
            "renewals": node.renewals,
            "renew_failures": node.renew_failures,
            "http_requests_forwarded": peers.forwarded,
        },
        "slots_assigned": fields["cluster_slots_assigned"],
        "slots_ok": fields["cluster_slots_ok"],
        "members": [
            {
                "id": view.id,
                "address": view.address,
                "state": view.state,
                "live": view.live,
                "myself": view.myself,
                "slots": sum(b - a + 1 for a, b in view.ranges),
                "ranges": [list(run) for run in view.ranges],
                "heartbeat_age": round(view.heartbeat_age, 3),
            }
            for view in node.nodes()
        ],
    }


def _info(node: ClusterNode) -> str:
    return "".join(f"{k}:{v}\r\n" for k, v in _fields(node).items())


def _fields(node: ClusterNode) -> dict[str, object]:
    views = node.nodes()
    live = {v.id for v in views if v.live}
    assigned = sum(1 for owner in node.owners if owner is not None)
    served = sum(1 for owner in node.owners if owner is not None and owner in live)
    fields: dict[str, object] = {
        "cluster_enabled": 1,
        "cluster_state": "ok" if served == SLOTS and node.valid() else "fail",
        "cluster_slots_assigned": assigned,
        "cluster_slots_ok": served,
        "cluster_slots_pfail": 0,
        "cluster_slots_fail": assigned - served,
        "cluster_known_nodes": len(views),
        "cluster_size": sum(1 for v in views if v.ranges),
        "cluster_current_epoch": node.top_epoch,
        "cluster_my_epoch": node.top_epoch,
        "tokenpool_node_state": "draining" if node.draining else node.state,
        "tokenpool_lease_valid": int(node.valid()),
        "tokenpool_slots_owned": len(node.owned),
        "tokenpool_slots_served": len(node.serving),
        "tokenpool_renewals": node.renewals,
        "tokenpool_renew_failures": node.renew_failures,
    }
    for view in views:  # each member: where it is, its state and what it owns
        fields[f"member_{view.id}"] = (
            f"address={view.address},state={view.state},live={int(view.live)},"
            f"slots={sum(b - a + 1 for a, b in view.ranges)},"
            f"heartbeat_ms={int(view.heartbeat_age * 1000)}"
        )
    return fields


@command("READONLY", 0, 0, "Cluster mode: accepted (no replicas: reads go to the owner)")
@command("READWRITE", 0, 0, "Cluster mode: accepted (undoes READONLY)")
def _readonly(p: Planner, session: Session, args: list[str]) -> Any:
    # redis-py reading from replicas sends READONLY on every connection; with no replica
    # listed in CLUSTER SLOTS, its reads go to the owner as before.
    return OFF if p.cluster is None else OK


@command("CLUSTER", 1, 2, "The cluster's nodes and slots, as Redis Cluster (cluster mode)")
def _cluster(p: Planner, session: Session, args: list[str]) -> Any:
    node: ClusterNode | None = p.cluster
    sub = args[0].upper()
    if node is None:
        return OFF
    if sub == "KEYSLOT" and len(args) == 2:
        return key_slot(args[1])
    if len(args) != 1:
        return Error(
            "ERR", f"unknown subcommand or wrong number of arguments for 'CLUSTER|{args[0][:20]}'"
        )
    if sub == "SLOTS":
        return _slots(node)
    if sub == "SHARDS":
        return _shards(node)
    if sub == "NODES":
        return _nodes(node)
    if sub == "INFO":
        return _info(node)
    if sub == "MYID":
        return node.id
    if sub in ("DRAIN", "UNDRAIN"):
        if p.gate.settings.admin_password is not None and session.client.user != "admin":
            return Error(
                "NOPERM",
                "this command needs the admin user: AUTH admin <password> (--admin-password)",
            )
        change = node.drain if sub == "DRAIN" else node.undrain

        async def run() -> Any:
            await change()
            return OK

        return Action(run)
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CLUSTER|{args[0][:20]}'"
    )


@command("ASKING", 0, 0, "Redis Cluster's ASKING: +OK (no slot is ever half-moved here)")
def _asking(p: Planner, session: Session, args: list[str]) -> Any:
    """Answered as Redis does, so a cluster client that sends it never breaks. Redis
    lets the next command reach a slot being imported; slots here move whole (release,
    then acquire), so there is never an importing slot: the next command is routed as
    any other (``MOVED`` to the owner, ``TRYAGAIN`` while it recovers the pool)."""
    return OFF if p.cluster is None else OK
