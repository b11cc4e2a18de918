"""The suite's own order (tests/conftest.py): the end-to-end runs marked ``slow`` first, longest first, so that
the workers that pytest-xdist hands them to one at a time finish together."""

from dataclasses import dataclass

import pytest
from conftest import pytest_collection_modifyitems, slow_minutes


@dataclass
class Item:
    name: str
    slow: pytest.Mark | None

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self.slow if name == "slow" else None


def test_the_hook_puts_slow_runs_first_longest_first_and_keeps_the_rest_in_order():
    items = [
        Item("fast_a", None),
        Item("slow_unhinted", pytest.mark.slow.mark),
        Item("fast_b", None),
        Item("slow_short", pytest.mark.slow(minutes=1).mark),
        Item("slow_long", pytest.mark.slow(minutes=6.5).mark),
        Item("fast_c", None),
    ]
    pytest_collection_modifyitems(items)
    assert [item.name for item in items] == ["slow_long", "slow_short", "slow_unhinted", "fast_a", "fast_b", "fast_c"]


def test_this_sessions_order_has_the_slow_runs_first_longest_first(request):
    items = request.session.items
    slow = [item.get_closest_marker("slow") is not None for item in items]
    assert slow == sorted(slow, reverse=True)
    hints = [slow_minutes(item) for item in items if item.get_closest_marker("slow")]
    assert hints == sorted(hints, reverse=True)
