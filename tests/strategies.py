"""Shared hypothesis strategies."""

from __future__ import annotations

import uuid

from hypothesis import strategies as st

USERS = [f"user-{i}" for i in range(8)]

users = st.sampled_from(USERS)

valid_user_ids = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"),
    ),
    min_size=1,
    max_size=32,
).filter(lambda s: len(s.encode()) <= 128 and not any(c.isspace() for c in s))

invalid_user_ids = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=10).map(lambda s: s + " "),
    st.text(min_size=1, max_size=10).map(lambda s: "\x00" + s),
    st.text(min_size=1, max_size=10).map(lambda s: s + "\n"),
    st.text(alphabet="ab", min_size=129, max_size=200),
    st.text(alphabet="é", min_size=65, max_size=100),  # 2 bytes each: over 128 bytes
    st.integers(),
    st.none(),
)

not_uuids = st.one_of(
    st.text(max_size=40).filter(lambda s: not _is_uuid(s)),
    st.integers(),
    st.none(),
)


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


class CountingIds:
    """Deterministic lease/token ids, so a reference model can predict them."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return str(uuid.UUID(int=self.n))
