"""The served model: one Generator (weights, KV cache) and its tokenizer, and how a Job runs on it.

The sparsity level is fixed for the server's life. `auto` takes the level spqt calibrate recorded in
the model's metadata as recommended, as spqt generate does, and dense when there is none (see
recommended_sparsity).

The prompt cache: a request's prompt that starts with what the one before left in the KV cache (its prompt, and its
answer where that was decoded dense), as a chat's next turn does, prefills only the rest (Generator.generate's reuse).
Its answer can differ from a whole prefill's where the last bits of the logits decide (llama.cpp's server, whose
cache_prompt does the same, says as much). The cache is one for all clients: cached_tokens (and the first token's
time) tells a client how long a prefix its prompt shares with the request before, another client's too. On CUDA the
rest of a prompt runs in prefill graphs captured at the start (Generator.capture_prefills' suffixes), and where it
has none the whole prompt runs in its own graph. The cache is on unless asked off: on an H200 a chat's second turn of
5,745 tokens streamed its first token after 23.5 ms with it against 96.2 ms without, one of 1,783 tokens after 13.1
against 12.8 ms (docs/RESULTS.md, thirty-fifth session); on the CPU it saves seconds.

An echo (/v1/completions): the prompt's text first; with logprobs its tokens' entries (Generator.score at the served
level, one more pass over the prompt, whose dense cache the prefill then takes up), and where the answer ends on a
stop token, that token's entry last (its text is not the answer's): lm-evaluation-harness reads exactly one entry
after the prompt's from a max_tokens 1 request, whichever token the model gave. The last prompt scored is kept, so a
request's further choices (n) and a repeated prompt take its scores without another pass (the pass is deterministic
at the fixed level).
"""

import logging
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from spqt import grammar
from spqt.checkpoint import LoadedModel
from spqt.errors import SpqtError
from spqt.generate import KEPT_ROUTE_NAMES, GenerationResult, Generator, PromptScores
from spqt.serve.logprobs import StepLogprobs, TokenLogprob
from spqt.serve.reasoning import budget_bounds, reasoning_template
from spqt.serve.scheduler import Job
from spqt.serve.text import CONTEXT_TOKENS, TextStream, token_starts
from spqt import sparsity as sp
from spqt.sparsity import check_sparsity
from spqt.tokenizer import TextTokenizer

log = logging.getLogger("spqt.serve")


def recommended_sparsity(loaded: LoadedModel, criterion: str | None = None,
                         mode: str | None = None) -> tuple[str, str, float]:
    """(criterion, mode, level) for --sparsity auto, as spqt generate picks it (sparsity.auto_level):
    the level spqt calibrate recommended (held-out perplexity within MAX_LOSS of dense), restricted to
    the criterion / mode given; level 0 (dense) when the model has no recommendation."""
    return sp.auto_level(loaded.thresholds, criterion and sp.check_criterion(criterion), mode)


def parse_sparsity(text: str) -> float | None:
    """'auto' -> None, else a level in [0, 1)."""
    if text == "auto":
        return None
    try:
        return check_sparsity(float(text))
    except ValueError:
        raise SpqtError(f"--sparsity takes a number in [0, 1) or auto, got {text!r}") from None


@dataclass
class EngineInfo:
    model_id: str
    device: str
    sparsity: float
    mode: str
    criterion: str
    ctx: int
    created: int


class Engine:
    @property
    def reasoning(self) -> bool:
        """Whether chat answers' <think> text goes to reasoning_content (spqt.serve.reasoning)."""
        return self.reasoning_format == "auto" and reasoning_template(self.tokenizer.spec.chat_template)

    @cached_property
    def vocabulary(self) -> grammar.Vocabulary:
        """The vocabulary structured output constrains (spqt.grammar), its end tokens the served stop ids."""
        return grammar.Vocabulary(self.tokenizer, self.generator.loaded.config.vocab_size, self.stop_ids)

    def __init__(self, loaded: LoadedModel, device: str = "cpu", sparsity: float | None = 0.0,
                 mode: str | None = None, ctx: int | None = None, name: str | None = None,
                 criterion: str | None = None, backend: str | None = None, prompt_cache: bool | None = None,
                 dense_fallback: bool = True, dtype: torch.dtype | None = None, reasoning_format: str = "auto",
                 thinking_budget: int | None = None):
        """sparsity None: the recommended level (dense when the model has none). mode, criterion:
        None for sp.default_mode / the model's default criterion, or with auto the recommendation's own.
        ctx: the KV cache length, which bounds prompt plus completion (default: the model's context).
        backend: the linear maps' (Generator's; None: the kernels on CUDA, the fp32 reference on the CPU).
        prompt_cache: reuse what the request before left in the KV cache (None: on; see the module's docstring).
        dense_fallback: maps below their crossover run dense (Generator's; off: every map as asked).
        dtype: the compute dtype (None: generate.default_dtype).
        reasoning_format: "auto" (a chat answer's <think> text as reasoning_content where the template thinks:
        reasoning) or "none" (all of it content). thinking_budget: a chat answer's thinking budget where the request
        gives none (spqt.serve.reasoning; None: no bound)."""
        if reasoning_format not in ("auto", "none"):
            raise SpqtError(f"--reasoning-format is auto or none, not {reasoning_format!r}")
        if thinking_budget is not None and thinking_budget < 0:
            raise SpqtError(f"--thinking-budget must be at least 0, got {thinking_budget}")
        self.reasoning_format, self.thinking_budget = reasoning_format, thinking_budget
        if sparsity is None:
            criterion, mode, sparsity = recommended_sparsity(loaded, criterion, mode)
            if not sp.by_criterion(loaded.thresholds).get("recommended"):
                log.info("the model has no recommended sparsity level (spqt calibrate measures one); "
                         "--sparsity auto serves dense")
        criterion = sp.check_criterion(criterion or sp.default_criterion(loaded.thresholds))
        mode = mode or sp.default_mode(loaded.thresholds, criterion)
        ctx = ctx or loaded.config.max_seq_len
        if not 1 < ctx <= loaded.config.max_seq_len:
            raise SpqtError(f"--ctx must be in [2, {loaded.config.max_seq_len}] for this model, got {ctx}")
        self.tokenizer = TextTokenizer(loaded.tokenizer, loaded.config)
        # (before the Generator: a budget that cannot be kept is one error line)
        if thinking_budget is not None and not budget_bounds(self.tokenizer, loaded.config.vocab_size,
                                                             "--thinking-budget"):
            log.info("the model's chat template writes no thinking: --thinking-budget bounds nothing")
        self.generator = Generator(loaded, device, dtype=dtype, sparsity=sparsity, mode=mode, max_len=ctx,
                                   criterion=criterion, backend=backend, dense_fallback=dense_fallback)
        self.stop_ids = self.tokenizer.stop_ids
        self.prompt_cache = True if prompt_cache is None else prompt_cache
        self.scored: tuple[tuple[int, ...], PromptScores] | None = None  # the last prompt scored whole, its scores
        # Achieved-sparsity counting adds small kernels to every linear map: on the CPU only, where it
        # costs little, so GPU timings in the log are the plain decode; not where every map runs dense
        dense_step = self.generator.dense_step_reason()
        self.track = self.generator.device == "cpu" and sparsity > 0 and dense_step is None
        dense, kept = self.generator.dense_fallbacks(), None if self.track else self.generator.kept_runs()
        if self.generator.device == "cuda":
            from spqt.bench import untuned_note

            note = untuned_note(loaded, sparse=sparsity > 0 and dense_step is None)
            if note:
                log.info("%s", note)
        if dense_step:
            log.info("every linear map runs dense: %s", dense_step)
        elif dense:
            log.info("%d of %d linear maps run dense: %s", len(dense), 4 * loaded.config.n_layers,
                     self.generator.dense_fallback_note())
        if kept:
            log.info("sparse maps in one launch each (MODE_KEPT): %s",
                     KEPT_ROUTE_NAMES[kept] + " (spqt tune --routes)" if self.generator.tuned_route_runs()
                     else f"as SPQT_SPARSE_KEPT={kept} asks")
        path = Path(loaded.path) if loaded.path else None
        self.info = EngineInfo(model_id=name or (path.stem if path else "model"), device=self.generator.device,
                               sparsity=sparsity, mode=mode if sparsity else "dense",
                               criterion=criterion if sparsity else "dense", ctx=ctx, created=int(time.time()))
        if self.tokenizer.spec.chat_template:
            self.tokenizer.chat_messages([{"role": "user", "content": "hi"}])  # builds the template once, now
        if self.generator.device == "cuda":
            start = time.perf_counter()
            top = self.generator.capture_prefills(ctx - 1, suffixes=self.prompt_cache)
            log.info("prefill graphs for prompts up to %d tokens%s captured in %.1f s", top,
                     " and for their rests after a cached prefix" if self.prompt_cache else "",
                     time.perf_counter() - start)

    def sparsity_label(self) -> str:
        i = self.info
        return f"sparsity {i.sparsity:g} {i.criterion} {i.mode}" if i.sparsity else "dense"

    def run(self, job: Job) -> str:
        """Generate on the worker thread, posting ("text", (piece, tokens)) events (tokens: the logprobs entries of
        the answer tokens whose text starts in the text posted so far, [] unless job.logprobs asks for them) and a
        final ("done", result) or ("cancelled", None); one log line. Returns "completed" or "cancelled"."""
        text = TextStream(self.tokenizer.decode, job.stops, context=job.prompt[-CONTEXT_TOKENS:])
        steps = StepLogprobs(job.logprobs, self.tokenizer.token_bytes) if job.logprobs is not None else None
        tokens, posted = [], 0  # the answer tokens' logprobs entries, how many were posted
        start = time.perf_counter()
        echoed = 0 if job.echo is None else len(job.echo)  # where the answer's text starts in the text returned
        scoring = 0.0  # seconds of the prompt's scoring pass (an echo's logprobs), 0 where none ran
        if job.echo is not None:
            entries = []
            if steps:
                entries, passed = self._prompt_logprobs(job, steps)
                scoring = time.perf_counter() - start if passed else 0.0
            if not job.cancelled.is_set():
                job.emit("text", (job.echo, entries))
        if job.max_tokens == 0 or job.cancelled.is_set():
            return self._finish(job, GenerationResult([], len(job.prompt), scoring, 0.0), start)

        def post(piece: str) -> None:
            nonlocal posted
            released = text.released() if steps else 0
            if piece or released > posted:
                job.emit("text", (piece, tokens[posted:released]))
                posted = released  # (0 without logprobs)

        ending = []  # with an echo, the entry of the stop token that ended the answer (module docstring)

        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                return True
            if token in self.stop_ids:  # generate() ends on it; its text is not part of the answer
                if steps and job.echo is not None:
                    ending.append(steps.take(token, offset=echoed + len(text.text)))
                return False
            if steps:
                tokens.append(steps.take(token, offset=echoed + len(text.text)))
            post(text.feed(token))
            return text.stopped

        result = self.generator.generate(job.prompt, job.max_tokens, job.sampling, stop_ids=self.stop_ids,
                                         on_token=on_token, track=self.track, reuse=self.prompt_cache,
                                         on_logits=steps.observe if steps else None,
                                         should_stop=job.cancelled.is_set)  # (a long prefill: layer by layer)
        if scoring:  # a dense pass left the prompt in the cache, which the prefill took up: the request's own work,
            # not an earlier request's (usage's cached_tokens), and the prompt's time is both passes'
            result = replace(result, prefill_seconds=scoring + result.prefill_seconds, cached_tokens=0)
        if not job.cancelled.is_set():
            post(text.flush())
            job.stop_found = text.found
            if text.stopped and result.finish_reason == "length":  # a stop string in the last tokens' unfinished
                result = replace(result, finish_reason="stop")  # character's text, which only the flush decodes
            elif ending:
                job.emit("text", ("", ending))
        return self._finish(job, result, start)

    def _prompt_logprobs(self, job: Job, steps: StepLogprobs) -> tuple[list[TokenLogprob], bool]:
        """The entries of job.prompt's tokens (Generator.score at the served level), offsets in job.echo, and whether
        a scoring pass ran (not where the last prompt scored was this one, with at least as many top tokens)."""
        key, k = tuple(job.prompt), job.logprobs
        if self.scored and self.scored[0] == key and self.scored[1].top_ids.shape[1] >= k:
            scores, passed = self.scored[1], False  # (steps.prompt takes its top k of them)
        else:
            scores, passed = self.generator.score(job.prompt, k, should_stop=job.cancelled.is_set), True
        if job.cancelled.is_set():
            return [], passed
        if passed:
            self.scored = (key, scores)
        added = job.prompt_added
        starts = [0] * added + token_starts(self.tokenizer.decode, job.prompt[added:])
        return steps.prompt(job.prompt, scores, [min(at, len(job.echo)) for at in starts]), passed

    def _finish(self, job: Job, result: GenerationResult, start: float) -> str:
        """The job's log line and its last event: ("done", result), or ("cancelled", None) where it was cancelled."""
        seconds = time.perf_counter() - start
        n = len(result.tokens)
        achieved = f" (achieved {100 * result.sparsity['all']:.1f}%)" if result.sparsity else ""
        cached = f" ({result.cached_tokens} cached)" if result.cached_tokens else ""
        echo = ", prompt echoed" + (" and scored" if job.logprobs is not None else "") if job.echo is not None else ""
        # (a job cancelled before its first token stopped within its prefill: no rate over the whole prompt)
        prefill = ("prefill stopped" if job.cancelled.is_set() and not n
                   else f"prefill {result.prefill_tokens_per_s:.0f} tokens/s")
        figures = (f"prompt {result.prompt_tokens}{cached} + completion {n} tokens in {seconds:.2f} s{echo}, "
                   f"{prefill}, decode {result.decode_tokens_per_s:.1f} tokens/s, {self.sparsity_label()}{achieved}")
        job.report(result, seconds)
        if job.cancelled.is_set():
            log.info("%s cancelled (%s) after %s", job.label, job.cancel_reason, figures)
            job.emit("cancelled")
            return "cancelled"
        log.info("%s 200 finish %s, %s", job.label, result.finish_reason, figures)
        job.emit("done", result)
        return "completed"
