"""The HTTP connection cap derived from the descriptor limit."""

from __future__ import annotations

import pytest

from fwcm.server.http import FD_RESERVE, HttpLimits


@pytest.mark.parametrize("nofile", [1024, 2048, 4096, 20_000, 65_536, 1 << 20])
def test_connections_and_one_accepted_backlog_fit_under_the_descriptor_limit(nofile: int) -> None:
    limits = HttpLimits().derive(nofile)
    assert 2 * limits.max_connections + limits.backlog + FD_RESERVE <= nofile
    assert 64 <= limits.backlog <= 2048
    assert limits.max_connections >= nofile // 4  # most descriptors serve HTTP


def test_explicit_limits_are_kept() -> None:
    limits = HttpLimits(head_timeout=1, idle_timeout=2, max_connections=8, backlog=16)
    assert limits.derive(1024) == limits
    assert HttpLimits(max_connections=8).derive(4096) == HttpLimits(max_connections=8, backlog=512)
