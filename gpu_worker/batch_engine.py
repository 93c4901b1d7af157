"""The node's inference engine: continuous batching over a paged KV cache, one step at a time.

Design note (learned from nano-vllm and vLLM v1's scheduler; our own code). Every request is a
``Sequence`` whose tokens are its prompt and what it generated so far; ``num_computed`` of them have
keys and values in the cache. A step gives each running sequence, oldest first, as many of its
uncomputed tokens as the step's token budget has left (one for a decode, a chunk for a prefill, so a
long prompt never stalls the batch), then admits waiting requests with what is left: first those it
preempted, then new ones through the in-process Local scheduler's ``get_requests``, called with the
engine's real budgets (free blocks, block size, reserved output blocks, the step's remaining tokens,
free sequence slots); a request resumed after tokens another node streamed (failover) is admitted like
a preempted one. One forward pass computes everything scheduled; each sequence whose tokens are
all computed samples its next one.

Blocks: an admitted sequence gets the blocks of all its known tokens at once (shared prefix blocks
included, see ``gpu_worker.kv_cache``), so its prefill never waits for memory; a decode that fills
its last block takes one more. When none is free the newest running sequence is preempted: its blocks
go back (keyed prefix blocks stay findable) and it is recomputed later from its tokens, with its
sampling generator and text decoder untouched, so it goes on exactly as if never interrupted.

Ends (``max_tokens``, end of text, a stop string, a cancel) take effect between steps and free the
blocks at once. What a step produced comes back as ``(request_id, GenerationStep)`` pairs, the same
steps ``Engine.generate`` yields for one request.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from gpu_worker.attention import PagedAttention, SequenceChunk, order_for_step
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine
from gpu_worker.kv_cache import BlockManager, PagedKVCache
from gpu_worker.sampling import advance_generator, make_generator, sample_next
from gpu_worker.steps import GenerationStep
from gpu_worker.stop import StopStringStream
from scheduler.config import UNBOUNDED, YEAR_S, SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result, SamplingParams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    request_id: str
    token_ids: list[int]  # prompt, then every generated token (the last one not yet computed)
    num_prompt_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None  # a seeded request's own; where its sampling left it
    decoder: StopStringStream  # the text of every generated token, cut at a stop string
    num_computed: int = 0  # tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of its leading full blocks
    cancelled: bool = False
    prefill_only: bool = False  # splitwise prefill: stop after the first token, exporting the prompt's KV
    imported_kv: dict[str, torch.Tensor] | None = None  # splitwise decode: the prompt's KV, handed over

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class EngineStats:
    preemptions: int = 0  # sequences preempted by recompute since the engine started
    generated_tokens: int = 0  # tokens sampled since the engine started
    steps: int = 0


class BatchEngine:
    """Runs many requests together on one ``Engine``'s model. Not thread-safe: one caller."""

    def __init__(self, engine: Engine, capacity: EngineCapacity | None = None) -> None:
        self.engine = engine
        self.capacity = (capacity or EngineCapacity()).check()
        shape = engine.model.cache_shape(next(engine.model.parameters()).dtype)
        num_blocks = self.capacity.kv_blocks(shape, engine.device)
        self.cache = PagedKVCache(shape, num_blocks, self.capacity.block_size, engine.device)
        self.blocks = BlockManager(num_blocks, self.capacity.block_size, self.capacity.enable_prefix_caching)
        self.waiting = InProcessScheduler(SchedulerConfig(scheduler_ttl=YEAR_S, scheduler_max_size=UNBOUNDED))
        self.sequences: dict[str, Sequence] = {}
        self.running: list[Sequence] = []  # admission order: the newest is preempted first
        self.preempted: deque[Sequence] = deque()  # resumed before anything new is admitted
        self.ended: list[tuple[str, GenerationStep]] = []  # ends decided between steps
        self.exported: dict[str, dict[str, torch.Tensor]] = {}  # prefill-only requests' KV, to hand over
        self.stats = EngineStats()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams,
                    resume_token_ids: Seq[int] = (), *, prefill_only: bool = False,
                    kv: dict[str, torch.Tensor] | None = None) -> None:
        """Queues a request; it is admitted at a step. ``resume_token_ids`` were generated (and
        yielded) by an earlier run: generation goes on after them, as ``Engine.generate`` does.

        Splitwise: a ``prefill_only`` request ends after its first token unless that token ended it;
        then ``exported[request_id]`` holds its prompt's keys and values (``kv_transfer``'s layout:
        ``k.<layer>``/``v.<layer>`` [1, heads, prompt_len, head_dim] on the CPU). A request given
        ``kv`` (that layout, with its first token as ``resume_token_ids``) is not prefilled: the
        keys and values are written into its blocks and it decodes from there.

        Raises ValueError for what ``Engine.generate`` refuses, for a request id already here, and
        for a request this engine's whole KV cache could never hold.
        """
        prompt_ids, resumed = list(prompt_ids), list(resume_token_ids)
        if request_id in self.sequences:
            raise ValueError(f"request {request_id!r} is already in the engine")
        self.engine.check_request(prompt_ids, sampling, resumed)
        self._check_fits(prompt_ids, sampling)
        generator = make_generator(sampling.seed) if sampling.temperature > 0 else None
        advance_generator(generator, len(resumed))
        decoder = self.engine.primed_text_stream(sampling, resumed)  # as the earlier run left it
        seq = Sequence(request_id, prompt_ids + resumed, len(prompt_ids), sampling, generator, decoder,
                       prefill_only=prefill_only, imported_kv=kv)
        if decoder.stopped:  # the resumed tokens had met a stop string: that run had ended
            self.ended.append((request_id, GenerationStep(len(resumed), -1, "", FINISH_STOP)))
            return
        if len(resumed) == sampling.max_tokens:
            self.ended.append((request_id, GenerationStep(len(resumed), -1, decoder.flush(), FINISH_LENGTH)))
            return
        self.sequences[request_id] = seq
        if resumed:  # it ran elsewhere already: it resumes like a preempted request, before new ones
            self.preempted.append(seq)
        else:
            self.waiting.put_requests([Request(request_id, seq.token_ids, sampling)])

    def _check_fits(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        cap, blocks = self.capacity, self.blocks
        need = blocks.blocks_for(len(prompt_ids) + sampling.max_tokens)
        prompt_blocks = blocks.blocks_for(len(prompt_ids))
        if prompt_blocks + cap.reserved_output_blocks > blocks.num_blocks:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) needs {prompt_blocks} KV blocks of "
                             f"{cap.block_size} tokens plus reserved_output_blocks="
                             f"{cap.reserved_output_blocks}: more KV blocks than this node's whole cache of "
                             f"{blocks.num_blocks} blocks")
        if need > blocks.num_blocks:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                             f"need "
                             f"{need} KV blocks of {cap.block_size} tokens; this node's whole cache has "
                             f"{blocks.num_blocks}: lower max_tokens")

    def cancel(self, request_id: str) -> None:
        """Ends the request at the next step with a "cancelled" marker (its blocks freed then)."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def abort(self, request_id: str) -> None:
        """Drops the request at once, yielding nothing more (another node carries it on)."""
        self.exported.pop(request_id, None)
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.sequences.pop(seq.request_id, None)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.preempted:
            self.preempted.remove(seq)
        self.blocks.free_blocks(seq)
        if seq.request_id in self.waiting.running:  # admitted: its final result lets the queue forget it
            self.waiting.put_results([Result(seq.request_id, finished=True, finish_reason="done")])
        else:
            self.waiting.cancel(seq.request_id)
        self.waiting.get_results()

    # -- state -------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self.sequences) - len(self.running))  # read by the heartbeat thread too

    @property
    def has_work(self) -> bool:
        return bool(self.sequences or self.ended)

    def free_slots(self) -> int:
        return max(0, self.capacity.max_num_seqs - len(self.sequences))

    def admission_budget(self) -> tuple[int, int, int]:
        """What the next step could admit beyond what the engine already holds: (free blocks, tokens,
        sequence slots), after the blocks and tokens held and waiting sequences will take."""
        held_blocks = sum(self.blocks.blocks_for(s.num_tokens) + self.capacity.reserved_output_blocks
                          for s in self.sequences.values() if not s.block_table)
        free_blocks = self.blocks.num_free_blocks - held_blocks
        tokens = self.capacity.max_num_batched_tokens - sum(
            s.num_tokens - s.num_computed for s in self.sequences.values())
        return max(0, free_blocks), max(0, tokens), self.free_slots()

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, GenerationStep]]:
        """One step: ends what was cancelled, schedules, runs one forward pass, samples."""
        outputs, self.ended = self.ended, []
        for seq in [s for s in self.sequences.values() if s.cancelled]:
            outputs.append((seq.request_id, GenerationStep(seq.num_output_tokens, -1, seq.decoder.flush(),
                                                           FINISH_CANCELLED)))
            self._release(seq)
        scheduled = self._schedule()
        if scheduled:
            outputs.extend(self._run(scheduled))
            self.stats.steps += 1
        return outputs

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute this step) for the running ones, then for the admitted ones."""
        budget = self.capacity.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.grow(seq, seq.num_computed + num_new):
                self._preempt(self.running.pop())  # the newest gives way
                preempted = True
                if seq not in self.running:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        if not preempted:
            budget = self._admit(scheduled, budget)
        return scheduled

    def _admit(self, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
        slots = self.capacity.max_num_seqs - len(self.running)
        while self.preempted and slots > 0 and budget > 0:
            seq = self.preempted[0]
            if self.blocks.blocks_for(seq.num_tokens) > self.blocks.num_free_blocks:
                return budget  # it goes first: nothing new overtakes it
            self.preempted.popleft()
            budget -= self._start(seq, scheduled, budget)
            slots -= 1
        if self.preempted or slots < 1 or budget < 1:
            return budget
        cap = self.capacity
        for request in self.waiting.get_requests(self.blocks.num_free_blocks, cap.block_size,
                                                 cap.reserved_output_blocks, budget, slots):
            budget -= self._start(self.sequences[request.request_id], scheduled, budget)
        return budget

    def _start(self, seq: Sequence, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
        if seq.imported_kv is not None:
            self.blocks.allocate(seq, seq.num_tokens, lookup=False)
            self._import(seq)
        else:
            seq.num_computed = self.blocks.allocate(seq, seq.num_tokens)
        num_new = min(seq.num_tokens - seq.num_computed, budget)
        self.running.append(seq)
        scheduled.append((seq, num_new))
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_blocks(seq)
        seq.num_computed = 0
        self.preempted.appendleft(seq)  # older victims end up in front: resumed in admission order
        self.stats.preemptions += 1
        log.debug("preempted %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)

    @torch.inference_mode()
    def _run(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[str, GenerationStep]]:
        chunks = [SequenceChunk(seq.block_table, seq.num_computed, n) for seq, n in scheduled]
        order = order_for_step(chunks)
        scheduled = [scheduled[i] for i in order]
        chunks = [chunks[i] for i in order]
        token_ids: list[int] = []
        positions: list[int] = []
        sampling_rows: list[int] = []
        for seq, n in scheduled:
            token_ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            positions.extend(range(seq.num_computed, seq.num_computed + n))
            if seq.num_computed + n == seq.num_tokens:
                sampling_rows.append(len(token_ids) - 1)
        device = self.engine.device
        attention = PagedAttention.build(self.cache, chunks, device)
        logits = self.engine.model.forward_packed(
            torch.tensor(token_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), attention,
            torch.tensor(sampling_rows, dtype=torch.long, device=device))  # [M, V]
        samplers = [seq for seq, n in scheduled if seq.num_computed + n == seq.num_tokens]
        next_ids = sample_next(logits, [s.sampling for s in samplers],
                               [s.generator for s in samplers]).tolist() if samplers else []
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.register_computed(seq, seq.num_computed)
        outputs = []
        for seq, token_id in zip(samplers, next_ids, strict=True):
            step = self.engine.step(seq.num_output_tokens, token_id, seq.sampling, seq.decoder)
            outputs.append((seq.request_id, step))
            self.stats.generated_tokens += step.token_id >= 0
            if step.finish_reason is None and seq.prefill_only:
                self.exported[seq.request_id] = self._export(seq)
                self._release(seq)
            elif step.finish_reason is not None:
                self._release(seq)
            else:
                seq.token_ids.append(token_id)
        return outputs

    # -- KV handoff (splitwise) ----------------------------------------------------------------------
    def _prompt_slots(self, seq: Sequence) -> torch.Tensor:
        bs = self.cache.block_size
        return torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_prompt_tokens)],
                            dtype=torch.long, device=self.engine.device)  # [P]

    def _export(self, seq: Sequence) -> dict[str, torch.Tensor]:
        slots, tensors = self._prompt_slots(seq), {}
        for layer in range(len(self.cache.k)):
            for kind, pool in (("k", self.cache.k[layer]), ("v", self.cache.v[layer])):
                rows = pool.view(-1, *pool.shape[2:]).index_select(0, slots)  # [P, kvh, hd]
                # [1, kvh, P, hd], as kv_transfer's handoffs
                tensors[f"{kind}.{layer}"] = rows.transpose(0, 1)[None].to("cpu").contiguous()
        return tensors

    def _import(self, seq: Sequence) -> None:
        slots, kv = self._prompt_slots(seq), seq.imported_kv
        for layer in range(len(self.cache.k)):
            k = kv[f"k.{layer}"][0].transpose(0, 1).to(self.cache.k[layer].device)  # [P, kvh, hd]
            v = kv[f"v.{layer}"][0].transpose(0, 1).to(self.cache.v[layer].device)
            self.cache.write(layer, slots, k, v)
        seq.num_computed = seq.num_prompt_tokens
        seq.imported_kv = None
        self.blocks.register_computed(seq, seq.num_computed)

    # -- what the node reports ----------------------------------------------------------------------
    def describe(self) -> str:
        cap = self.capacity
        return (f"{cap.max_num_seqs} sequences, {cap.max_num_batched_tokens} tokens a step, "
                f"{self.blocks.num_blocks} KV blocks of {cap.block_size}, prefix caching "
                f"{'on' if cap.enable_prefix_caching else 'off'}")

    def figures(self) -> dict[str, int | float | str]:
        """The heartbeat's engine figures (see ``fdconsole.nodes.status``)."""
        hit_rate = self.blocks.hit_rate
        return {"batch": len(self.running), "waiting": self.num_waiting,
                "kv_blocks_used": self.blocks.num_used_blocks, "kv_blocks_total": self.blocks.num_blocks,
                "prefix_hit_rate": "" if hit_rate is None else round(hit_rate, 4),
                "preemptions": self.stats.preemptions}
