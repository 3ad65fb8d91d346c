"""Grammar-constrained decoding with xgrammar: compiled grammars, per-sequence matchers, token bitmasks.

* ``GrammarCompilerCache`` compiles ``StructuredOutputParams`` for one
  tokenizer and model vocabulary, each distinct (kind, text) once. It needs
  only the tokenizer, so a data-parallel job's parent checks rows with it.
* ``SequenceGrammar`` is one sequence's matcher. The engine advances it with
  each token it accepts and never with a pending one, so it always matches
  the sequence's known output tokens; ``sync`` replays them should that ever
  not hold (a rollback), and ``fork`` gives a forked sample its own matcher.
  It also tracks where the text is inside a UTF-8 character (``utf8_guard``).
* ``StructuredOutputs`` is the engine's side: it checks requests, makes
  matchers, and fills a step's bitmask on the CPU (xgrammar's threads) into a
  pinned buffer copied to the device in one transfer.
* ``GrammarMask`` is that bitmask on the device; the sampler applies it
  (forbidden tokens -> -inf) before penalties, temperature and truncation.

xgrammar is imported on first use: requests without a constraint never load it.
"""
from __future__ import annotations

import collections
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..sampling_params import SamplingParams
from ..structured_output import StructuredOutputError, StructuredOutputParams
from .sequence import PENDING
from .utf8_guard import Utf8Guard

_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
               "choice": "choice list", "grammar": "EBNF grammar"}
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the rest is the message.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_FILL_TIMES_KEPT = 1024  # the latest per-step fill times, for percentiles (stats() runs after every server step)


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise StructuredOutputError("structured_output", f"needs the xgrammar package (pip install xgrammar): {e}") \
            from None
    return xgrammar


def _clean(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


class GrammarCompilerCache:
    """Compiled grammars for one tokenizer, keyed by ``StructuredOutputParams.key`` (an LRU of ``max_entries``).

    ``vocab_size`` is the model's (its embedding may have more rows than the
    tokenizer has tokens: those are never allowed); ``stop_ids`` end a grammar
    (the engine's EOS ids). Mapping the tokenizer takes seconds for a large
    vocabulary, so it happens on the first compile. Failures, a bad grammar or
    a tokenizer xgrammar cannot map, are ``StructuredOutputError``s naming the
    field; they are cached too, so a bad schema repeated in many rows costs one try.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int], max_entries: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(t for t in stop_ids if 0 <= t < vocab_size)
        self.max_entries = max_entries
        self._compiler = None
        self._unmappable: Optional[str] = None  # why the tokenizer cannot be mapped, once found
        self.utf8: Optional[Utf8Guard] = None  # built with the compiler, from the same decoded vocabulary
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.compile_s = 0.0

    def _get_compiler(self, where: str):
        if self._unmappable is not None:
            raise StructuredOutputError(where, self._unmappable)
        if self._compiler is None:
            xgr = _import_xgrammar()
            if self.tokenizer is None:
                raise StructuredOutputError(where, "needs a tokenizer, and this engine has none (skip_tokenizer_init)")
            try:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids or None)
            except Exception as e:  # xgrammar raises several types for a tokenizer it cannot read
                self._unmappable = (f"this model's tokenizer ({type(self.tokenizer).__name__}) cannot be mapped for "
                                    f"constrained decoding: {_clean(e)}")
                raise StructuredOutputError(where, self._unmappable) from None
            special = set(info.special_token_ids) | set(info.stop_token_ids)
            self.utf8 = Utf8Guard(info.decoded_vocab, special, self.vocab_size)
            # Our LRU is the cache; xgrammar's own would keep every grammar for ever.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def check(self, params: SamplingParams) -> None:
        """Compile the request's grammar, if any (``RowPreparer``'s check in a data-parallel parent)."""
        if params.structured_output is not None:
            self.compile(params.structured_output)

    def compile(self, so: StructuredOutputParams):
        """The compiled grammar of ``so`` (an ``xgrammar.CompiledGrammar``); StructuredOutputError if it cannot compile."""
        key = so.key
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        else:
            t0 = time.perf_counter()
            try:
                hit = self._compile(so)
            except StructuredOutputError as e:
                if self._compiler is None:
                    raise  # the tokenizer could not be mapped: not this grammar's fault, nothing to cache
                hit = e
            self.compile_s += time.perf_counter() - t0
            self._cache[key] = hit
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if isinstance(hit, StructuredOutputError):
            raise hit
        return hit

    def _compile(self, so: StructuredOutputParams):
        compiler = self._get_compiler(so.where)
        try:
            if so.kind == "json":
                return compiler.compile_json_schema(_bounded_strings_as_patterns(so.json), any_whitespace=False)
            if so.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if so.kind == "regex":
                return compiler.compile_regex(so.regex)
            if so.kind == "choice":
                # JSON string escapes are valid EBNF string literals.
                return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in so.choice))
            return compiler.compile_grammar(so.grammar)
        except Exception as e:  # xgrammar reports bad input as RuntimeError (and sometimes others)
            raise StructuredOutputError(so.where, f"the {_KIND_NAMES[so.kind]} cannot be compiled: {_clean(e)}") \
                from None


# Schema values that are data, not subschemas: never rewritten.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _bounded_strings_as_patterns(schema):
    """The schema with each plain length-bounded string (``minLength``/``maxLength``, no pattern, format,
    enum or const) given as the equivalent pattern instead.

    xgrammar 0.2.9 lowers a length-bounded string to a character class that
    excludes only the quote, the backslash, CR and LF, so raw control
    characters get through: invalid JSON (mlc-ai/xgrammar issue 800, open).
    This pattern allows the same characters minus U+0000-U+001F (neither
    form allows escapes).
    """
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYWORDS else _bounded_strings_as_patterns(v)) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    if out.get("type") == "string" and (lo is not None or hi is not None) and \
            not any(k in out for k in ("pattern", "format", "enum", "const")) and \
            all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in (lo, hi)):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = "^[^\\x00-\\x1f\"\\\\]{%d,%s}$" % (lo or 0, "" if hi is None else hi)
    return out


def _ebnf_literal(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


class SequenceGrammar:
    """One sequence's position in its grammar: an xgrammar matcher over its accepted output tokens."""

    def __init__(self, compiled, utf8: Utf8Guard, stop_ids: Optional[list[int]] = None, matcher=None):
        self.compiled = compiled
        self.utf8 = utf8
        self.stop_ids = stop_ids  # None: the compiled grammar's (the engine's EOS ids)
        if matcher is None:
            matcher = _import_xgrammar().GrammarMatcher(compiled, override_stop_tokens=stop_ids)
        self.matcher = matcher
        self.num_accepted = 0
        self.utf8_state = 0  # utf8_guard.STATES index: 0 at a character boundary
        self.ended = False  # the matcher accepted a stop token: the grammar is complete
        self.broken = False  # a token the grammar forbids was accepted (never, while the mask is applied)

    def accept(self, token: int) -> bool:
        """Advance by one generated token; False if the grammar forbids it (then the sequence must stop)."""
        state = self.utf8.next_state(self.utf8_state, token) if not (self.ended or self.broken) else -1
        if state < 0 or not self.matcher.accept_token(token):
            self.broken = True
            return False
        self.num_accepted += 1
        self.utf8_state = state
        self.ended = self.matcher.is_terminated()
        return True

    def sync(self, output_ids: list[int]) -> None:
        """Make the matcher match ``output_ids`` (the known output tokens): replay them if its count differs."""
        if len(output_ids) == self.num_accepted:
            return
        self.matcher.reset()
        self.num_accepted, self.utf8_state, self.ended, self.broken = 0, 0, False, False
        for t in output_ids:
            if not self.accept(t):
                break

    def fork(self) -> "SequenceGrammar":
        """An independent matcher in the same state, for a forked sample (``n`` > 1)."""
        child = SequenceGrammar(self.compiled, self.utf8, self.stop_ids, matcher=self.matcher.fork())
        child.num_accepted, child.utf8_state = self.num_accepted, self.utf8_state
        child.ended, child.broken = self.ended, self.broken
        return child


@dataclass
class GrammarMask:
    """One step's token bitmask on the device: the rows of the sampling batch it constrains and their bits."""

    rows: torch.Tensor  # [R] int64, rows of the sampling batch
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32, bit t of a row set = token t allowed
    all_rows: bool  # rows is 0..B-1: mask the batch without gathering rows
    banned_table: torch.Tensor  # [256, 8] bool: byte value -> which of its 8 bits are 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with every token the rows' grammars forbid at -inf (out of place: ``x`` may be the raw logits)."""
        R, V = self.bitmask.shape[0], x.shape[-1]
        # Little-endian int32 words: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7, lowest bit first.
        banned = self.banned_table.index_select(0, self.bitmask.view(torch.uint8).flatten().int())
        banned = banned.view(R, -1)[:, :V]
        if self.all_rows:
            return x.masked_fill(banned, float("-inf"))
        sub = x.index_select(0, self.rows).masked_fill_(banned, float("-inf"))
        return x.index_copy(0, self.rows, sub)


class StructuredOutputs:
    """The engine's structured-output state: the compile cache, matchers, the bitmask buffer and its timing."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int], device: torch.device):
        assert sys.byteorder == "little", "GrammarMask reads the int32 bitmask as little-endian bytes"
        self.compiler = GrammarCompilerCache(tokenizer, vocab_size, eos_ids)
        self.vocab_size = vocab_size
        self.eos_ids = set(self.compiler.stop_ids)
        self.device = device
        self.words = -(-vocab_size // 32)
        self._batch = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads
        self._staging = torch.empty(0, dtype=torch.int32)
        self._copied = None  # CUDA event after the last copy out of the staging buffer
        self._banned_table = None
        self.fill_s = 0.0
        self.fill_steps = 0
        self.fill_rows = 0
        self._fill_times: collections.deque = collections.deque(maxlen=_FILL_TIMES_KEPT)

    def check(self, params: SamplingParams) -> None:
        """Compile (cached) the request's grammar; StructuredOutputError naming the field if it cannot run."""
        self.compiler.check(params)

    def new_grammar(self, params: SamplingParams) -> SequenceGrammar:
        """A fresh matcher for the request's grammar; its stop tokens are the EOS ids and its own stop_token_ids."""
        compiled = self.compiler.compile(params.structured_output)
        extra = {t for t in params.stop_token_ids if 0 <= t < self.vocab_size} - self.eos_ids
        return SequenceGrammar(compiled, self.compiler.utf8, sorted(self.eos_ids | extra) if extra else None)

    def fill_bitmask(self, rows: list[int], seqs: list, num_rows: int) -> GrammarMask:
        """Fill the masks of sampling rows ``rows`` (of ``num_rows``) from ``seqs``' grammars on the CPU, and
        queue the copy to the device.

        Each sequence's newest token may be the PENDING one this step samples;
        its matcher must have accepted exactly the tokens before it (replayed
        if not). A sequence that has already stopped has a void token here:
        any mask will do.
        """
        t0 = time.perf_counter()
        R, W = len(rows), self.words
        host = self._stage(R * (1 + W))
        host[:R] = torch.tensor(rows, dtype=torch.int32)
        bits = host[R:].view(R, W)
        live, live_rows, guarded, states = [], [], [], []
        utf8 = self.compiler.utf8
        for i, seq in enumerate(seqs):
            g = seq.grammar
            if not seq.is_finished and g is not None:
                known = seq.num_output_tokens - (seq.token_ids[-1] == PENDING)
                if known != g.num_accepted:
                    g.sync(seq.output_token_ids[:known])
                if not (g.ended or g.broken):
                    live.append(g.matcher)
                    live_rows.append(i)
                    if g.utf8_state or utf8.check_boundary:
                        guarded.append(i)
                        states.append(g.utf8_state)
                    continue
            bits[i].fill_(-1)
        if live:
            if self._batch is None:
                self._batch = _import_xgrammar().BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask(live, bits, live_rows)
        if guarded:  # rows inside a multi-byte character: only a valid continuation may follow
            rows_t = torch.tensor(guarded)
            bits.index_copy_(0, rows_t, bits.index_select(0, rows_t) & utf8.masks.index_select(
                0, torch.tensor(states)))
        cuda = self.device.type == "cuda"
        dev = host.to(self.device, non_blocking=True) if cuda else host.clone()
        if cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        if self._banned_table is None:
            self._banned_table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).eq(0).to(self.device)
        dt = time.perf_counter() - t0
        self.fill_s += dt
        self.fill_steps += 1
        self.fill_rows += R
        self._fill_times.append(dt)
        rows_t = dev[:R].long()
        return GrammarMask(rows_t, dev[R:].view(R, W), rows == list(range(num_rows)), self._banned_table)

    def _stage(self, n: int) -> torch.Tensor:
        if self._copied is not None:
            self._copied.synchronize()  # free in practice: that copy's step has been collected
        if self._staging.numel() < n:
            self._staging = torch.empty(max(n, 2 * self._staging.numel()), dtype=torch.int32,
                                        pin_memory=self.device.type == "cuda")
        return self._staging[:n]

    def reset_stats(self) -> None:
        """Start the fill-time statistics over (benchmarks time one run at a time)."""
        self.fill_s, self.fill_steps, self.fill_rows = 0.0, 0, 0
        self._fill_times.clear()

    def stats(self) -> dict:
        """Bitmask fill time (host), total and per step that had constrained rows (p50/p99 over the
        latest steps); compile time."""
        times = sorted(self._fill_times)
        pct = (lambda q: 1e3 * times[min(len(times) - 1, int(q * len(times)))]) if times else (lambda q: 0.0)
        return {
            "structured_steps": self.fill_steps,
            "structured_rows": self.fill_rows,
            "bitmask_fill_s": self.fill_s,
            "bitmask_fill_ms_mean": 1e3 * self.fill_s / self.fill_steps if self.fill_steps else 0.0,
            "bitmask_fill_ms_p50": pct(0.5),
            "bitmask_fill_ms_p99": pct(0.99),
            "grammar_compile_s": self.compiler.compile_s,
        }
