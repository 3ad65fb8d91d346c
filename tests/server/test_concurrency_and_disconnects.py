"""Many clients share one engine; a client that leaves has its request aborted and its KV blocks freed."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from model_factory import SAFE_PROMPTS
from pagedbatch import SamplingParams

LONG = dict(temperature=0, max_tokens=1800, ignore_eos=True)  # seconds of work: still running when the client leaves


def _requests(n: int) -> list[dict]:
    return [{"prompt": SAFE_PROMPTS[i % len(SAFE_PROMPTS)], "temperature": 0, "ignore_eos": True,
             "max_tokens": 8 + (i % 5) * 4} for i in range(n)]


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, list[int], str]:
    text, ids, reason = [], [], None
    async with client.stream("POST", url + "/generate_stream", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text.append(event["text"])
            ids += event["token_ids"]
            reason = event["finish_reason"] or reason
    return "".join(text), ids, reason


def test_32_concurrent_streaming_clients_all_get_their_offline_text(server, offline):
    bodies = _requests(32)
    refs = offline.generate([b["prompt"] for b in bodies],
                            [SamplingParams(temperature=0, ignore_eos=True, max_tokens=b["max_tokens"]) for b in bodies])

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(_stream_one(client, server.url, b) for b in bodies))

    results = asyncio.run(main())
    for (text, ids, reason), ref in zip(results, refs):
        assert ids == ref.token_ids
        assert text == ref.text
        assert reason == "length"
    stats = server.wait_idle()
    assert stats["requests_finished"] == 32
    # Clients were batched together, not served one after another.
    assert stats["peak_running"] > 1
    assert stats["free_blocks"] == stats["num_blocks"]


@pytest.mark.parametrize("extra", [{}, {"n": 3}], ids=["one-sample", "three-samples"])
def test_a_client_that_disconnects_mid_stream_has_its_request_aborted_and_blocks_freed(server, extra):
    before = server.wait_idle()
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/generate_stream",
                           json={"prompt": "dog hello 42", **LONG, **extra}) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator would close the connection already
            chunks = 0
            while chunks < 3:
                chunks += next(lines).startswith("data: ")
            during = server.stats()
            assert during["active_requests"] == 1 and during["free_blocks"] < before["free_blocks"]
        # Leaving the block closes the connection with the response unread.
    started = time.monotonic()
    after = server.wait_idle(timeout=5)
    assert time.monotonic() - started < 1.0, "the abort took as long as the generation would have"
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_finished"] == before["requests_finished"]  # it never ran to max_tokens
    assert after["free_blocks"] == before["free_blocks"] == after["num_blocks"]


def test_a_client_that_gives_up_on_generate_has_its_request_aborted(server):
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json={"prompt": "dog hello 42", **LONG}, timeout=0.3)
    after = server.wait_idle(timeout=5)
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_finished"] == before["requests_finished"]
    assert after["free_blocks"] == after["num_blocks"]
