"""The inference engine of a node: the model, loaded once, and generation on top of it.

Design note: generation is (1) prefill, which runs the whole prompt through the model into a fresh
KV cache and gives the logits of its last position, then (2..n) decode steps, each feeding the token
just sampled and reading the next logits. Prefill and decode are separate methods so that a node can
run them on different machines or batch them across requests.

Batches of different-length prompts are left-padded (see ``gpu_worker.model``). Padding changes
nothing mathematically, but a row may differ from an unbatched run in the last float bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from gpu_worker.loader import load_model, resolve_dtype
from gpu_worker.model import GPT, GPTConfig, KVCache, build_model
from gpu_worker.model_source import TINY
from gpu_worker.sampling import advance_generator, check_sampling, make_generator, sample_next
from gpu_worker.steps import GenerationStep
from gpu_worker.stop import StopStringStream
from gpu_worker.tokenizer import ByteTokenizer, text_stream
from scheduler.messages import SamplingParams

FINISH_LENGTH = "length"  # max_tokens reached; carried by the last token's step
FINISH_STOP = "stop"  # end of text (a final marker step) or a stop string (the token that completed it)
FINISH_CANCELLED = "cancelled"  # should_stop() returned True; carried by a final marker step


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` is cuda when torch sees a GPU, else cpu; other names must exist and be usable."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


class Engine:
    """A model on one device, loaded once per process. Not thread-safe: one generation at a time.

    ``model`` is a name of ``gpu_worker.model_source``: ``tiny`` (the default; ``config`` sizes it) runs
    the seeded GPT in float32 unless ``dtype`` says otherwise; a checkpoint (``smollm2``, a path) is
    loaded by ``gpu_worker.loader`` in ``dtype`` (default: float32 on the CPU, bfloat16 on CUDA) and
    served only through the batching engine (``forward_packed``). ``config`` is then the key KV
    handoffs compare (``gpu_worker.loader``). Raises ValueError (``CheckpointError`` among them) for a
    device, dtype or model that cannot be served.
    """

    def __init__(self, device: str | torch.device = "auto", config: GPTConfig | None = None,
                 model: str = TINY, dtype: str | torch.dtype | None = None) -> None:
        self.device = resolve_device(device)
        self.model_name = model
        if model == TINY:
            self.dtype = resolve_dtype(dtype or torch.float32, self.device)
            self.config = config or GPTConfig()
            self.model: GPT = build_model(self.config, self.device).to(self.dtype)
            self.tokenizer = ByteTokenizer()
        else:
            if config is not None:
                raise ValueError("config sizes the built-in model only; a checkpoint brings its own")
            self.dtype = resolve_dtype(dtype, self.device)
            loaded = load_model(model, self.device, self.dtype)
            self.config, self.model, self.tokenizer = loaded.handoff_key, loaded.model, loaded.tokenizer
        eos = loaded.eos_token_ids if model != TINY else self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)  # any of them ends a generation

    @property
    def max_model_len(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _dense(self) -> None:
        if self.model_name != TINY:
            raise ValueError(f"model {self.model_name!r} is served through the batching engine only "
                             "(gpu_worker.batch_engine); the dense path is the built-in model's")

    @torch.inference_mode()
    def prefill(self, prompt_ids_batch: Sequence[Sequence[int]],
                max_len: int | None = None) -> tuple[KVCache, torch.Tensor]:
        """Step 1: runs the prompts into a new KV cache of ``max_len`` slots (default: block_size).

        Prompts of different lengths are left-padded. Returns the cache and the logits [B, V] of
        each prompt's last token.
        """
        self._dense()
        prompts = [self._checked_ids(ids, "prompt") for ids in prompt_ids_batch]
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        longest = max(len(ids) for ids in prompts)
        max_len = self.config.block_size if max_len is None else max_len
        if longest > max_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit a KV cache of {max_len} slots")
        pad = [longest - len(ids) for ids in prompts]
        rows = [[0] * n + ids for n, ids in zip(pad, prompts, strict=True)]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)  # [B, T]
        kv_cache = KVCache(self.config, len(rows), max_len, self.device, pad=pad)
        logits = self.model(idx, kv_cache)  # [B, T, V]
        return kv_cache, logits[:, -1, :]  # [B, V]: left padding puts every last token in column -1

    @torch.inference_mode()
    def decode_step(self, kv_cache: KVCache, token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Steps 2..n: appends one token per row to ``kv_cache``; returns the next logits [B, V]."""
        self._dense()
        idx = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).view(-1, 1)  # [B, 1]
        if idx.size(0) != kv_cache.batch_size:
            raise ValueError(f"{idx.size(0)} tokens for a KV cache of {kv_cache.batch_size} rows")
        return self.model(idx, kv_cache)[:, -1, :]  # [B, V]

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 should_stop: Callable[[], bool] | None = None,
                 resume_token_ids: Sequence[int] = ()) -> Iterator[GenerationStep]:
        """Generates up to ``sampling.max_tokens`` tokens after ``prompt_ids``, one step at a time.

        Yields a ``GenerationStep`` per generated token, indexed from 0. How it ends:

        - "length": the step of token ``max_tokens - 1`` carries ``finish_reason="length"``; its text
          also holds whatever the stream decoder still had (an unfinished character as U+FFFD).
        - "stop": the model sampled end of text. The end-of-text token is not yielded; instead a final
          marker ``GenerationStep(index=n, token_id=-1, text=<flushed text, often "">, "stop")``
          comes last, where n is the number of tokens generated.
        - "stop", for one of ``sampling.stop``: the step of the token whose text completed the stop
          string carries it, with that token's id (as vLLM keeps it in the output) and only the text
          before the stop string. Text that could be the start of a stop string is held back (steps
          with "" or less text) until later tokens tell; an end of another kind releases it: the
          "length" step's text, or the final marker's. See ``gpu_worker.stop``.
        - "cancelled": ``should_stop()`` returned True; it is asked before every token, the first
          included. The same kind of final marker comes last, with ``finish_reason="cancelled"``.

        ``resume_token_ids`` are tokens an earlier run already generated (and yielded): the prompt and
        them are prefilled together and generation continues at index ``len(resume_token_ids)``,
        yielding what an uninterrupted run would have yielded from there on, text included. Greedy
        runs match exactly, and so do seeded ones, because each sampled step takes exactly one number
        from the request's generator and resuming skips the numbers of the resumed steps. Unseeded
        sampling uses torch's default RNG and cannot be replayed. Resuming a run that had already
        produced ``max_tokens`` tokens yields only a final marker with ``finish_reason="length"``; one
        whose tokens had met a stop string, only a final marker with "stop" and no text.

        Raises ValueError at the call (not at the first ``next``) for bad token ids or sampling
        parameters, and when the prompt plus ``max_tokens`` does not fit the context.
        """
        prompt_ids, resumed = list(prompt_ids), list(resume_token_ids)
        self.check_request(prompt_ids, sampling, resumed)
        return self._generate(prompt_ids, sampling, should_stop, resumed)

    def _generate(self, prompt_ids: list[int], sampling: SamplingParams,
                  should_stop: Callable[[], bool] | None, resumed: list[int]) -> Iterator[GenerationStep]:
        generator = make_generator(sampling.seed) if sampling.temperature > 0 else None
        advance_generator(generator, len(resumed))
        decoder = self.primed_text_stream(sampling, resumed)
        index = len(resumed)
        if decoder.stopped:  # the resumed tokens had met a stop string already (their run ended there)
            yield GenerationStep(index, -1, "", FINISH_STOP)
            return
        if index == sampling.max_tokens:
            yield GenerationStep(index, -1, decoder.flush(), FINISH_LENGTH)
            return
        if should_stop is not None and should_stop():
            yield GenerationStep(index, -1, decoder.flush(), FINISH_CANCELLED)
            return
        kv_cache, token_id = self._first_token(prompt_ids, resumed, sampling, generator)
        step = self.step(index, token_id, sampling, decoder)
        yield step
        if step.finish_reason is None:
            yield from self.continue_decoding(kv_cache, token_id, index + 1, sampling, generator, decoder,
                                              should_stop)

    def primed_text_stream(self, sampling: SamplingParams, resumed: Sequence[int] = ()) -> StopStringStream:
        """The text decoder of a request's output, fed the ``resumed`` tokens already streamed: it
        rebuilds the state their run had (a split character, held-back text, a stop string met)."""
        decoder = text_stream(self.tokenizer, sampling.stop)
        for token_id in resumed:
            decoder.push(token_id)  # already sent: only the state is wanted
        return decoder

    def step(self, index: int, token_id: int, sampling: SamplingParams,
             decoder: StopStringStream) -> GenerationStep:
        """The step for a freshly sampled ``token_id``: a token, or the end (stop, length)."""
        if token_id in self.eos_token_ids:
            return GenerationStep(index, -1, decoder.flush(), FINISH_STOP)
        text = decoder.push(token_id)
        if decoder.stopped:  # its text completed a stop string: the token ends the output
            return GenerationStep(index, token_id, text, FINISH_STOP)
        if index < sampling.max_tokens - 1:
            return GenerationStep(index, token_id, text)
        return GenerationStep(index, token_id, text + decoder.flush(), FINISH_LENGTH)

    def continue_decoding(self, kv_cache: KVCache, last_token: int, index: int, sampling: SamplingParams,
                          generator: torch.Generator | None, decoder: StopStringStream,
                          should_stop: Callable[[], bool] | None) -> Iterator[GenerationStep]:
        """Decode steps from ``index`` on: ``last_token`` (index - 1) was yielded and is not yet in
        ``kv_cache``; ``generator`` and ``decoder`` are where the run left them. Shared by ``generate``
        and a decode node continuing after a KV handoff."""
        token_id = last_token
        for i in range(index, sampling.max_tokens):
            if should_stop is not None and should_stop():
                yield GenerationStep(i, -1, decoder.flush(), FINISH_CANCELLED)
                return
            token_id = self._next_token(kv_cache, token_id, sampling, generator)
            step = self.step(i, token_id, sampling, decoder)
            yield step
            if step.finish_reason is not None:
                return

    def _first_token(self, prompt_ids: list[int], resumed: list[int], sampling: SamplingParams,
                     generator: torch.Generator | None) -> tuple[KVCache, int]:
        # The cache must hold the prompt and every token generated but the last (never fed back).
        max_len = len(prompt_ids) + sampling.max_tokens
        kv_cache, logits = self.prefill([prompt_ids + resumed], max_len)  # step 1: prefill, logits [1, V]
        return kv_cache, self.sample(logits, sampling, generator)

    def _next_token(self, kv_cache: KVCache, token_id: int, sampling: SamplingParams,
                    generator: torch.Generator | None) -> int:
        logits = self.decode_step(kv_cache, [token_id])  # steps 2..n: decode, logits [1, V]
        return self.sample(logits, sampling, generator)

    @staticmethod
    def sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
        with torch.inference_mode():
            return int(sample_next(logits, [sampling], [generator])[0])

    def check_request(self, prompt_ids: list[int], sampling: SamplingParams,
                      resumed: Sequence[int] = ()) -> None:
        """Raise ValueError for what ``generate`` refuses (also used before a KV handoff)."""
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        self._checked_ids(prompt_ids, "prompt")
        self._checked_ids(resumed, "resume_token_ids")
        check_sampling(sampling)
        if sampling.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {sampling.max_tokens}")
        if len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                             f"exceeds the model's context of {self.max_model_len} tokens")
        if len(resumed) > sampling.max_tokens:
            raise ValueError(f"{len(resumed)} resume tokens exceed max_tokens={sampling.max_tokens}")
        if not self.eos_token_ids.isdisjoint(resumed):
            raise ValueError("resume_token_ids holds end of text: that generation had already stopped")

    def _checked_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids, vocab = list(ids), range(self.vocab_size)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id not in vocab:
                raise ValueError(f"{what} holds {token_id!r}, not a token id in 0..{vocab.stop - 1}")
        return ids
