"""Cluster mode: pools spread over nodes by hash slot, each slot owned by one node at a
time through a lease held in PostgreSQL (``slots``: the pure rules; ``lease``: the
local validity rule; ``directory``: the tables; ``node``: the task that keeps a node's
place in the cluster)."""
