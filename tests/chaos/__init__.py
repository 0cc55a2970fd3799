"""The reliability suite: record concurrent histories against real server processes,
check them against the reference model, inject crashes, database faults and hostile
clients. ``python -m tests.chaos`` (``make chaos``) runs it; the short versions
run in the tests."""
