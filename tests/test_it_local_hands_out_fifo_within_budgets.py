"""get_requests hands out waiting requests in put order, as many as the KV-block and token budgets allow.

A request costs ceil(prompt_len / block_size) + reserved_output_blocks blocks and prompt_len tokens.
The first request of a call is taken whenever its blocks fit, even past the token budget, so a long
prompt cannot block the queue forever; the first one that does not fit ends the batch.
"""

import pytest

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request


def scheduler_with(*prompt_lens: int) -> InProcessScheduler:
    s = InProcessScheduler(SchedulerConfig())
    answers = s.put_requests([Request(f"r{i}", [7] * n) for i, n in enumerate(prompt_lens)])
    assert all(error is None for _, error in answers)
    return s


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def test_requests_come_out_in_put_order() -> None:
    s = scheduler_with(*[10] * 6)
    assert ids(s.get_requests(1000, 16, 0, 10_000, batch=2)) == ["r0", "r1"]
    assert ids(s.get_requests(1000, 16, 0, 10_000, batch=10)) == ["r2", "r3", "r4", "r5"]
    assert s.get_requests(1000, 16, 0, 10_000, batch=10) == []


def test_batch_caps_the_number_handed_out() -> None:
    s = scheduler_with(1, 1, 1)
    assert ids(s.get_requests(1000, 16, 0, 10_000)) == ["r0"]  # batch defaults to 1


def test_block_budget_counts_prompt_blocks_rounded_up() -> None:
    # 17 tokens at block_size 16 = 2 blocks each; 5 blocks hold two of them, not three.
    s = scheduler_with(17, 17, 17)
    assert ids(s.get_requests(5, 16, 0, 10_000, batch=3)) == ["r0", "r1"]


def test_reserved_output_blocks_are_added_per_request() -> None:
    # 16 tokens = 1 block + 2 reserved = 3 blocks each; 8 blocks hold two.
    s = scheduler_with(16, 16, 16)
    assert ids(s.get_requests(8, 16, 2, 10_000, batch=3)) == ["r0", "r1"]
    assert ids(s.get_requests(9, 16, 2, 10_000, batch=3)) == ["r2"]


def test_nothing_when_blocks_do_not_exceed_the_reserve() -> None:
    s = scheduler_with(1)
    assert s.get_requests(2, 16, 2, 10_000, batch=1) == []
    assert s.get_requests(1, 16, 2, 10_000, batch=1) == []
    assert ids(s.get_requests(3, 16, 2, 10_000, batch=1)) == ["r0"]


def test_nothing_when_blocks_only_cover_the_reserve_even_for_an_empty_prompt() -> None:
    s = scheduler_with(0)  # needs 0 prompt blocks + 2 reserved = exactly the 2 available
    assert s.get_requests(2, 16, 2, 10_000, batch=1) == []
    assert ids(s.get_requests(3, 16, 2, 10_000, batch=1)) == ["r0"]


@pytest.mark.parametrize("batch", [0, -1])
def test_nothing_when_batch_is_below_one(batch: int) -> None:
    s = scheduler_with(1)
    assert s.get_requests(100, 16, 0, 10_000, batch=batch) == []
    assert s.stats()["waiting"] == 1


def test_token_budget_limits_the_batch() -> None:
    s = scheduler_with(40, 40, 40)
    assert ids(s.get_requests(1000, 16, 0, 100, batch=3)) == ["r0", "r1"]
    assert ids(s.get_requests(1000, 16, 0, 80, batch=3)) == ["r2"]


def test_a_prompt_exactly_filling_the_token_budget_fits() -> None:
    s = scheduler_with(50, 50, 1)
    assert ids(s.get_requests(1000, 16, 0, 100, batch=3)) == ["r0", "r1"]


def test_first_request_is_taken_when_its_blocks_fit_even_past_the_token_budget() -> None:
    s = scheduler_with(500, 1)
    assert ids(s.get_requests(1000, 16, 0, 100, batch=2)) == ["r0"]  # r1 waits for the next call
    assert ids(s.get_requests(1000, 16, 0, 100, batch=2)) == ["r1"]


def test_first_request_is_taken_when_it_needs_every_available_block() -> None:
    s = scheduler_with(64, 1)  # 4 blocks + 1 reserved = 5
    assert ids(s.get_requests(5, 16, 1, 10_000, batch=2)) == ["r0"]


def test_a_head_that_does_not_fit_the_blocks_waits_and_nothing_skips_ahead() -> None:
    s = scheduler_with(160, 1, 1)  # r0 needs 10 blocks; r1 and r2 need 1 each
    assert s.get_requests(5, 16, 0, 10_000, batch=3) == []
    assert ids(s.get_requests(12, 16, 0, 10_000, batch=3)) == ["r0", "r1", "r2"]


def test_a_request_that_does_not_fit_ends_the_batch() -> None:
    s = scheduler_with(16, 160, 16)  # 1, 10, 1 blocks
    assert ids(s.get_requests(5, 16, 0, 10_000, batch=3)) == ["r0"]
    assert ids(s.get_requests(10, 16, 0, 10_000, batch=3)) == ["r1"]
    assert ids(s.get_requests(10, 16, 0, 10_000, batch=3)) == ["r2"]


def test_handed_out_requests_are_running_and_not_handed_out_again() -> None:
    s = scheduler_with(1, 1)
    first = s.get_requests(1000, 16, 0, 10_000, batch=1)
    assert s.stats()["waiting"] == 1 and s.stats()["running"] == 1
    second = s.get_requests(1000, 16, 0, 10_000, batch=5)
    assert ids(first) == ["r0"] and ids(second) == ["r1"]


def test_the_request_object_is_handed_out_unchanged() -> None:
    s = InProcessScheduler(SchedulerConfig())
    request = Request("a", [3, 1, 4, 1, 5])
    s.put_requests([request])
    assert s.get_requests(10, 4, 0, 100) == [request]


def test_block_size_below_one_is_refused() -> None:
    s = scheduler_with(1)
    with pytest.raises(ValueError, match="block_size"):
        s.get_requests(100, 0, 0, 100)
