"""Hooks for the schemathesis run (``SCHEMATHESIS_HOOKS=tests.schemathesis_hooks``).

The schema the run generates from caps pool sizes at 1,000 (the API allows
10,000,000): a pool of millions takes a gigabyte and tens of seconds to grow
(a step of 2,000 tokens at a time, other clients served between the steps),
so each such case would only outlast the request timeout and the CI machine's
memory. Everything else is generated from the API's own document.
"""

from typing import Any

import schemathesis


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    for name in ("PoolIn", "PoolChange"):
        size = raw_schema["components"]["schemas"][name]["properties"]["size"]
        for variant in [size, *size.get("anyOf", [])]:
            if "maximum" in variant:
                variant["maximum"] = 1_000
