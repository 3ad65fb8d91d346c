"""Named benchmark workloads: prompts as random token ids, output lengths, EOS ignored."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    model_config: str  # file under configs/models/
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def w1(n: int = 512) -> Workload:
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 150_000) for _ in range(rng.randint(128, 512))] for _ in range(n)]
    return Workload("W1", "qwen2.5-7b.json", prompts, [256] * n)


def w_nano() -> Workload:
    # nano-vllm's bench.py: random.seed(0), 256 sequences, lengths 100..1024,
    # token ids 0..10000, temperature 0.6, EOS ignored; same call order.
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    max_tokens = [rng.randint(100, 1024) for _ in range(256)]
    return Workload("W-nano", "qwen3-0.6b.json", prompts, max_tokens, temperature=0.6)


def single() -> Workload:
    """Single-stream decode: one 128-token prompt, 512 output tokens, Qwen2.5-7B shape (latency-bound)."""
    rng = random.Random(5)
    return Workload("single", "qwen2.5-7b.json", [[rng.randrange(0, 150_000) for _ in range(128)]], [512])


def tiny() -> Workload:
    """A CPU-sized smoke workload on a tiny Qwen3 shape (checks the script, not speed)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(8, 32))] for _ in range(8)]
    return Workload("tiny", "tiny-qwen3.json", prompts, [8] * 8)


def w2(n: int = 1000) -> Workload:
    """Shared prefix: one 1,024-token system prompt + a 50-200-token question; outputs 64-512."""
    rng = random.Random(2)
    system = [rng.randrange(0, 150_000) for _ in range(1024)]
    prompts = [system + [rng.randrange(0, 150_000) for _ in range(rng.randint(50, 200))] for _ in range(n)]
    return Workload("W2", "qwen2.5-7b.json", prompts, [rng.randint(64, 512) for _ in range(n)])


def w3(groups: int = 50, per_group: int = 20) -> Workload:
    """Few-shot groups: 50 distinct 2,000-token prefixes x 20 questions (20-100 tokens), shuffled; outputs 32-128."""
    rng = random.Random(3)
    prefixes = [[rng.randrange(0, 150_000) for _ in range(2000)] for _ in range(groups)]
    prompts = [p + [rng.randrange(0, 150_000) for _ in range(rng.randint(20, 100))]
               for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return Workload("W3", "qwen2.5-7b.json", prompts, [rng.randint(32, 128) for _ in prompts])


def w4(n: int = 1000) -> Workload:
    """Skewed outputs: 256-token prompts; outputs mostly 32-128, 5% 2,048."""
    rng = random.Random(4)
    prompts = [[rng.randrange(0, 150_000) for _ in range(256)] for _ in range(n)]
    max_tokens = [2048 if rng.random() < 0.05 else rng.randint(32, 128) for _ in range(n)]
    return Workload("W4", "qwen2.5-7b.json", prompts, max_tokens)


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W-nano": w_nano, "single": single, "tiny": tiny}
