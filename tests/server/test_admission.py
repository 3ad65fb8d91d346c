"""max_tokens is settled before a request joins the batch: explicit values that cannot fit are refused
naming the field, defaults shrink to fit."""
import pytest

from pagedbatch.server.admission import resolve_max_tokens
from pagedbatch.server.errors import RequestError

LIMITS = dict(max_model_len=100, cache_tokens=1000, cap=100)


def test_an_explicit_max_tokens_that_fits_is_kept():
    assert resolve_max_tokens(10, 90, None, **LIMITS) == 90


@pytest.mark.parametrize("requested, words", [(91, "exceeds the model's maximum length of 100"),
                                              (101, "above this server's limit of 100"), (0, ">= 1")])
def test_an_explicit_max_tokens_that_cannot_fit_is_refused_naming_max_tokens(requested, words):
    with pytest.raises(RequestError) as e:
        resolve_max_tokens(10, requested, None, **LIMITS)
    assert e.value.param == "max_tokens" and words in e.value.message and e.value.status == 400


def test_the_default_shrinks_to_the_room_left_and_the_cap():
    assert resolve_max_tokens(10, None, 16, **LIMITS) == 16
    assert resolve_max_tokens(95, None, 16, **LIMITS) == 5
    assert resolve_max_tokens(10, None, None, **LIMITS) == 90  # chat: all the room left
    assert resolve_max_tokens(10, None, None, max_model_len=100, cache_tokens=1000, cap=30) == 30


def test_the_kv_cache_bounds_a_request_like_the_model_length_does():
    with pytest.raises(RequestError, match="whole KV cache of 50"):
        resolve_max_tokens(10, 45, None, max_model_len=100, cache_tokens=50, cap=100)


def test_a_prompt_that_fills_the_context_is_refused_naming_the_prompt_field():
    with pytest.raises(RequestError) as e:
        resolve_max_tokens(100, None, 16, prompt_field="messages", **LIMITS)
    assert e.value.param == "messages"
