"""The engine: the one generation loop (continuous batching over a paged KV cache).

    engine = Engine(model, tokenizer, EngineConfig())
    rid = engine.add_request("Once upon", SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutputs that changed this step
            ...                            # out.finished, out.outputs[j].text / token_ids
    engine.abort(rid)                      # (any time) drop a request and free its blocks
    engine.update_weights()                # (between generations) the model's weights changed

Each step the scheduler picks sequences and token counts (lmforge.infer.scheduler), the runner runs them
as one flat forward and samples every row at once (lmforge.infer.runner), and the engine appends the
tokens, forks the n samples of a request after its prefill, registers full blocks for prefix caching,
detokenizes, applies stop conditions and frees finished sequences. Requests join and leave at every
step. The model is used as given: `model(ids, positions, cache, meta)`; its `cache_spec()` sizes the
paged cache, and a model without one runs on the plain recompute path. A request's strategy may take
over its logits: beam search (lmforge.infer.beam) and speculative decoding (lmforge.infer.speculative,
drafting for the whole batch with a draft model: lmforge.infer.draft).

Host work per step (bench/engine_host.py --vocab 1024, a zero-cost stub model, one CPU core, 2026-12): ~2.1 ms
at 256 decoding sequences (~8 us per sequence: scheduling and block accounting ~0.4 ms, input building ~0.5,
grouping and drawing samples, then appending tokens, detokenizing, stop checks, prefix-block registration
~0.8). Async scheduling (EngineConfig.async_scheduling, on a GPU by default; vLLM v1's idea) takes most of it
off the device's critical path: a decode's shape (one token, its slot, its blocks) does not depend on the
token's value, so each step() first schedules and launches the next step, its decode input ids copied on the
device from the pending step's sampled tokens (runner.LateIds, in the eager inputs, the CUDA-graph static
buffer and the kernel step alike), and only then reads the pending step's tokens and does the host work above
while the device runs the new one (lmforge.infer.pending). The tokens are copied to pinned host memory right
behind their step and read through an event (lmforge.utils.HostCopy): a plain .tolist() would wait for the
step launched after it too (measured on an H200: slower than not overlapping at all). With the next step
launched first, stop conditions are applied one step late: a sample that ends by EOS, a stop id or a stop
string has computed one more token, dropped and never shown, and holds its blocks a step longer; max_tokens
and the context window are known ahead, so no row is scheduled past them. Prefill chunks overlap too (their
sampled rows become decodes of the next step the same way). A step's tokens are read at once, as without async
scheduling, when the next step needs their values: any row of a beam search or speculative request
(strategies: any draft turns it off for the engine), penalties (the sampler reads the history), prompt
log-probs, the first sample of a request with n > 1 (its samples fork from it), and the recompute runner
(which takes it off). Seeded streams draw in the same order, so samples equal the synchronous engine's;
update_weights and reset_prefix_cache read a pending step (its rows all finished or aborted) first.

What later work attaches to:
  evaluation   SamplingParams(prompt_logprobs=k): the step's forward also takes logits at the prompt
               positions of each chunk (logits_indices extended; chunked prefill and preemption keep
               each position's log-prob exactly once), RequestOutput.prompt_logprobs; LLM.score is
               lm-eval's loglikelihood on top. Cost: chunk length x V logits for those requests, whose
               owed positions are computed, not taken from the prefix cache (vLLM skips the cache for
               them altogether; prompt_logprobs_start lets a shared context still hit it).
  RL rollouts  the engine may hold the very module a Trainer updates in place; update_weights() then
               drops what the old weights computed (the prefix cache), or copies a state_dict in.
               Steps run the model in eval mode and hand it back in the mode they found it.
  drafters     a drafter with `uses_hidden_states` gets the target's features with each context: True, the
               sampled row's (Sampled.hidden); "all", every verified position's, each once, in order
               (Sampled.features -> Sequence.features); hidden_layers, blocks' outputs (lmforge.infer.features).
  servers      lmforge.infer.async_engine streams each request and aborts one without the others. One request
               cannot cost the others unbounded work: top log-probs are at most EngineConfig.max_logprobs, and
               strict_admission (a server's 400s) refuses n or beam_width above max_num_seqs, samples whose blocks
               the pool cannot hold at once, and prompt + max_tokens past the window (SamplingParams(max_tokens=None)
               runs to the window).
  KV policies  EngineConfig(kv_policy=...) (lmforge.infer.kv.policy: StreamingLLM, SnapKV): each running
               sequence's plan is applied before the schedule (compaction; a sequence keeps num_slots keys
               beside its num_computed positions), forks apply it first, observed steps get the score hook.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.admission import STREAM_LEN, check_caps, check_length, check_prompt_logprobs_start, unfit_error
from lmforge.infer.blocks import BlockPool
from lmforge.infer.detok import StreamDecoder, continuation_context, special_ids
from lmforge.infer.config import (EngineConfig, graph_prefill_tokens, kv_dtype, limits, pool_blocks, rope_allows,
                                  serving_spec, store_allows, use_fused_kernels, use_kernel_step, use_kernel_tune)
from lmforge.infer.kv.paged import decode_kernel
from lmforge.infer.kv.state import check_engine as check_state_engine, check_request as check_state_request, marked
from lmforge.infer.outputs import PromptIds, RequestOutput
from lmforge.infer.pending import Launched, overlaps
from lmforge.infer.request import Request, Sequence, Status, checked_prompt_index, encode_prompt, seed_for, stop_ids
from lmforge.infer.runner import (Extra, PagedRunner, RecomputeRunner, copy_weights, prompt_rows, row_for,
                                  sampling_rows)
from lmforge.infer.sampler import SharedStream, forget, kind_of, logprob_entries
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler, SchedulerConfig
from lmforge.infer.speculative import attach_drafter, draft_step, pool_model, speculates
from lmforge.utils import compute_dtype, eval_mode

Prompt = str | list[int]


class Engine:
    """draft: None, or speculative decoding for every request with this drafter, but beam searches and requests
    with penalties or logits_processors, which run plain beside them (lmforge.infer.speculative.speculates):
    'ngram' (prompt lookup), 'mtp' (the model's parallel MTP heads), a draft model sharing the tokenizer,
    or a drafter object (lmforge.infer.speculative); num_draft_tokens drafts per round. A drafter object
    with `uses_hidden_states` (EAGLE/Medusa style: True, "all", and `hidden_layers`; lmforge.infer.features)
    gets the target's features with each context: the model must accept `return_hidden` (lmforge's
    Transformer and HFCausalLM do); an "all" head module with `pairs` and `cache_spec` keeps its attention
    cache in this engine's blocks (lmforge.infer.draft.PagedDraftHead). A drafter with `proposes_trees = True`
    (lmforge.infer.token_tree.TreeDrafter) proposes token trees, up to its
    `tree_size` nodes per step (num_draft_tokens does not apply), on models with a cache_spec() (the paged
    runner). acceptance: which drafts verification keeps (lmforge.infer.acceptance, e.g. Medusa's
    TypicalAcceptance with draft='mtp'); None: the drafter's own `acceptance`, else the exact rule."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *, draft=None,
                 num_draft_tokens: int = 4, acceptance=None):
        self.config = config = config or EngineConfig()
        self.model = model  # its mode is the caller's (a Trainer may share it): steps switch to eval mode
        if getattr(tokenizer, "has_text", True) and not callable(getattr(tokenizer, "decode", None)):
            # (outputs' texts decode every token: an AttributeError deep in detok.py at the first step; token-id
            # callers pass lmforge.infer.detok.IdTokenizer, has_text = False)
            raise ConfigError(f"the engine needs a tokenizer with decode(), got {type(tokenizer).__name__}; pass the "
                              "model's own (lmforge.load_tokenizer(path), or LLM.load(checkpoint), which loads the one "
                              "saved with it; IdTokenizer(vocab_size) for token ids without text)")
        self.tokenizer = tokenizer
        first = next(model.parameters(), None)
        if first is None:  # (the engine reads the model's device, dtype and cache from its parameters)
            raise ConfigError(f"the model ({type(model).__name__}) has no parameters: the engine reads its device "
                              "and dtype from them; hold the weights as parameters (requires_grad=False for frozen "
                              "ones), not only as buffers")
        self.device = first.device
        self.dtype = compute_dtype(model)  # (not a quantized layer's integer codes)
        spec = model.cache_spec() if hasattr(model, "cache_spec") else None
        self.has_state = spec is not None and spec.has_state  # recurrent-state layers: lmforge.infer.kv.state
        check_state_engine(config, draft, self.has_state, type(model).__name__)
        if config.kv_policy is not None:  # refusals first (lmforge.infer.kv.policy)
            from lmforge.infer.kv.policy import check_engine as check_policy_engine

            check_policy_engine(config.kv_policy, spec, draft, config)
        spec = serving_spec(model, spec, config.max_model_len)  # the window served: EngineConfig.max_model_len
        self.max_seq_len, self.vocab_size = limits(model, spec)
        # a HF checkpoint's end-of-sequence ids (config.json / generation_config.json eos_token_id)
        self.eos_ids = tuple(getattr(model, "eos_token_ids", None) or ())
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        if tok_vocab is not None and tok_vocab > self.vocab_size:
            raise ConfigError(f"tokenizer vocab_size={tok_vocab} is larger than the model's vocab_size="
                              f"{self.vocab_size}: this tokenizer was not made for this model; give the model's own "
                              "(the one saved with it, or --tokenizer / tokenizer= naming it)")
        self.vocab_limit = tok_vocab if tok_vocab is not None and tok_vocab < self.vocab_size else None
        self.special_ids = special_ids(tokenizer)  # left out of texts asking skip_special_tokens
        narrow = spec is not None and kv_dtype(config, spec) != spec.dtype  # a cache narrower than the model
        allows = store_allows(config, spec, draft)  # what a CacheStore (EngineConfig.kv_cache) can serve
        allows = rope_allows(config, model, allows, self.has_state)  # and a length-dependent RoPE (dynamic NTK...)
        if spec is None and config.kv_cache_dtype is not None or narrow and config.kernel_step:
            raise ConfigError(f"kv_cache_dtype={config.kv_cache_dtype!r} needs a model with cache_spec() (the paged "
                              "cache) and no kernel_step=True (the kernel step reads keys in the model's dtype)")
        if spec is None and config.prefix_caching:
            raise ConfigError(f"prefix_caching=True needs a model with cache_spec() (the paged cache whose blocks it "
                              f"reuses); {type(model).__name__} has none (the recompute path runs every sequence "
                              "from scratch); leave prefix_caching unset")
        if spec is None:
            num_blocks = -(-config.max_num_seqs * self.max_seq_len // config.block_size)
            self.runner = RecomputeRunner(model, self.device)
        else:
            on_pool = pool_model(draft)  # a draft model or head whose cache shares the pool's block ids
            draft_bytes = on_pool.cache_spec().bytes_per_token() if on_pool is not None else 0
            num_blocks = pool_blocks(config, spec, self.device, self.max_seq_len, draft_bytes)
            # graphs pad every row's block table to a bucket: worth it over the kernel, which reads only each
            # row's keys, not over the gather reference (default: on a GPU when the kernel is there)
            kernel = decode_kernel(self.device, config.decode_attention) is not None
            graphs = (config.cuda_graphs if config.cuda_graphs is not None else self.device.type == "cuda" and kernel
                      ) and allows["cuda_graphs"]
            self.runner = PagedRunner(model, spec, num_blocks, config.block_size, self.device, kv_dtype(config, spec),
                                      graphs=(("cuda" if self.device.type == "cuda" else "eager") if graphs else None),
                                      max_batch=config.max_num_seqs, decode=config.decode_attention,
                                      prefill=config.prefill_attention,
                                      kernel_step=(not self.has_state and config.kv_policy is None and not narrow
                                                   and allows["kernel_step"]
                                                   and use_kernel_step(config, model, self.device)),
                                      kernel_tune=use_kernel_tune(config, model),
                                      fused_kernels=use_fused_kernels(config, self.device), store=config.kv_cache,
                                      mixed_tokens=graph_prefill_tokens(config, self.device))
        # state models: prefix hits need state snapshots (lmforge.infer.kv.state)
        wanted = config.prefix_caching is not False  # (None: on where it can be)
        snapshots = config.state_snapshots if self.has_state and wanted else 0
        caching = spec is not None and wanted and (snapshots > 0 or not self.has_state) and allows["prefix_caching"]
        self.pool = BlockPool(num_blocks, config.block_size, caching)
        # when every attention layer slides (Mistral; Samba: recurrent layers between sliding ones, which keep
        # no keys), blocks behind the window are freed as sequences advance
        windows = [layer.window for layer in spec.layers if layer.kind != "state"] if spec is not None else [0]
        self.window = min(windows) if windows and all(windows) else 0
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   chunked_prefill=config.chunked_prefill,
                                                   reserve_samples=self.has_state), self.pool)
        self.scheduler.on_release = self._released
        if snapshots:
            self.runner.cache.keep_snapshots(snapshots)
            self.scheduler.snapshots = self.runner.cache.snapshot_rows
        self.kv_policy = None  # a KV policy at work: lmforge.infer.kv.policy
        self.stream_len = self.max_seq_len
        """how long a sequence may grow: the model's window, unless a KV policy keeps positions within the cache"""
        if config.kv_policy is not None:
            from lmforge.infer.kv.policy import PolicySession, key_rotation

            rotate = key_rotation(config.kv_policy, model, self.max_seq_len)
            self.kv_policy = PolicySession(config.kv_policy, self.pool, self.runner.cache, spec, rotate)
            self.scheduler.observed_tail = config.kv_policy.observed_tail
            if rotate is not None:  # positions are slots, which the policy keeps below the window
                self.scheduler.max_positions, self.stream_len = self.max_seq_len, STREAM_LEN
        attach_drafter(self, draft, num_draft_tokens, num_blocks, acceptance)  # lmforge.infer.speculative
        on = config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        self.async_scheduling = on and isinstance(self.runner, PagedRunner) and draft is None
        self._pending: Launched | None = None  # a step whose tokens the host has not read yet
        self.requests: dict[str, Request] = {}
        self._ids, self._seq_ids, self._arrivals = itertools.count(), itertools.count(), itertools.count()
        self.rng = SharedStream(device=self.device).manual_seed(int(torch.randint(2**62, ())))
        """the random stream every unseeded request draws from (sampling, drafts, verification), seeded here by one
        draw from torch's RNG (building an engine moves it once; generating never does), so rollouts or an
        evaluation inside a training loop leave its dropout and data order as they were (torch.manual_seed before
        building the engine still makes unseeded samples reproducible). Seeded requests draw from their own
        generators (_generator)"""

    # requests ------------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, prompt_index: int | None = None) -> str:
        """Queue a prompt (text or token ids); returns its id. Bad input raises a one-line error and
        leaves the engine as it was (the checks: lmforge.infer.admission); prompt_index names the prompt in it
        (prompt i of a caller's batch; None: the prompt's own errors say 'prompt 0', the request's name none)."""
        self._sync_adapters()
        if prompt_index is not None:
            prompt_index = checked_prompt_index(prompt_index)
        params = params or SamplingParams.default()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            rid = self.free_request_id()
        else:
            rid = str(request_id)
        if rid in self.requests:
            raise LmforgeError(f"request id {rid!r} is already in use; pass another request_id")
        if self.has_state:
            check_state_request(params, self.config.max_num_seqs)
        check_caps(self, params)
        ids = self.encode(prompt, params, prompt_index or 0)
        check_prompt_logprobs_start(ids, params, prompt_index)
        params, length = check_length(self, ids, params, prompt_index)
        req = Request(rid, prompt if isinstance(prompt, str) else None, PromptIds(ids), params, next(self._arrivals),
                      kind=kind_of(params), eos=frozenset(stop_ids(params, self.tokenizer, self.eos_ids)),
                      arrival_time=time.perf_counter(), max_len=length)
        # sample j's stream: drawn from for its first token (from the shared prefill logits) and after
        req.generators = [self._generator(params, j) for j in range(params.n)]
        req.context = continuation_context(ids, self.special_ids)  # what the completions' texts continue
        # a score-only request (max_tokens=0) never runs its last token: nothing reads that position's logits
        req.seqs.append(self._sequence(req, 0, list(ids[:-1] if params.max_tokens == 0 and len(ids) > 1 else ids)))
        req.forked = params.max_tokens == 0  # its one sample exists: no first token forks others
        if params.beam_width > 1:
            from lmforge.infer.beam import BeamSearch

            req.strategy, req.forked = BeamSearch(req, self.tokenizer, self.stream_len), True
        elif self.make_drafter is not None and params.max_tokens and speculates(params):
            from lmforge.infer.speculative import Speculative

            req.strategy = Speculative(req, self.make_drafter, self.num_draft_tokens, self.hidden)
        req.overlaps = (req.strategy is None and not params.penalized and params.prompt_logprobs is None
                        and not params.logits_processors  # (they read every earlier output token)
                        and params.max_tokens > 0)  # a score-only request ends when its prefill is read
        self.requests[rid] = req
        self.scheduler.add(req.seqs[0])
        return rid

    def encode(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> list[int]:
        """Tokenize and validate one prompt (lmforge.infer.request.encode_prompt)."""
        return encode_prompt(self.tokenizer, prompt, params, index, self.vocab_size, self.stream_len)

    def free_request_id(self, taken=()) -> str:
        """The next automatic request id that no running request holds, nor any id in `taken` (a front end's
        own, e.g. AsyncEngine's finished requests whose outputs are still held)."""
        rid = str(next(self._ids))
        while rid in self.requests or rid in taken:
            rid = str(next(self._ids))
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now, free its blocks, and return its output so far."""
        req = self.requests.get(str(request_id))
        if req is None:
            raise LmforgeError(f"no running request with id {request_id!r} (finished, aborted or never added)")
        self._abort(req)
        return req.output()

    def _abort(self, req: Request) -> None:
        """Drop a request: its running samples end ('abort') and free their blocks (a step still pending
        drops their rows: Launched.stale)."""
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
        req.aborted = True
        for s in req.seqs:
            if s.status != Status.FINISHED:
                s.finish = s.finish or "abort"
                if s.decoder is not None:  # bytes held for a character still incomplete show, as at any finish
                    s.text += s.decoder.flush()
                self.scheduler.finish(s)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # weights -------------------------------------------------------------------------------------
    def update_weights(self, weights=None, *, partial: bool = False) -> None:
        """The model's weights changed (RL rollouts generate with the policy a Trainer is updating).

        weights: None = the engine's model itself was changed in place (it is the very module the
        trainer steps); a state_dict or a module with the same parameter names = copied into the
        engine's model in place (load_state_dict, strict; partial=True: only the tensors it names, e.g. an RL
        policy's trainable ones, lmforge.train.distributed.sync_rollout). Then what was computed from the old weights
        is dropped: the prefix cache (reset_prefix_cache). The decode backends stay valid without a
        rebuild: CUDA graphs replay the parameters' addresses and the kernel step reads the model's own
        weight tensors, and in-place updates (optimizer steps, copy_, load_state_dict) keep both; if the
        parameters were replaced by new tensors, the runner rebuilds them. A separate draft model is not
        touched. Refused while requests are running (their cached keys come from the old weights) and for
        a model moved since the engine was built (e.g. by Trainer(model); the KV cache stays behind)."""
        self._refuse_while_running("update_weights")
        self._drain()
        p, dtype = next(self.model.parameters()), compute_dtype(self.model)
        if p.device != self.device:
            raise LmforgeError(f"update_weights: the model moved from {self.device} to {p.device} after the engine "
                               f"was built; move it first (model.to('{p.device}')), then build the engine")
        if dtype != self.dtype:  # the KV cache and captured graphs hold the old dtype
            raise LmforgeError(f"update_weights: the model's dtype changed from {self.dtype} to {dtype} after the "
                               f"engine was built; cast it back (model.to({self.dtype})) or build a new engine")
        if weights is not None:
            copy_weights(self.model, weights, partial)
        self.runner.refresh_weights()
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (and the hit statistics): later prompts compute all their keys.
        Refused while requests are running (they hold and extend cached blocks)."""
        self._refuse_while_running("reset_prefix_cache")
        self._drain()
        self.pool.reset_prefix_cache()
        if self.scheduler.snapshots is not None:
            self.runner.cache.drop_snapshots()

    def _refuse_while_running(self, what: str) -> None:
        if self.requests:
            raise LmforgeError(f"{what} with {len(self.requests)} request(s) running; let them finish "
                               "(has_unfinished() is False) or abort them first")

    def _drain(self) -> None:
        """Read a step still pending with no request running (its rows are all finished or aborted ones,
        dropped), so that nothing on the device still uses the old weights or cache."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish(pending, {})

    # the loop ------------------------------------------------------------------------------------
    def step(self, finished_only: bool = False, watch: Collection[str] = ()) -> list[RequestOutput]:
        """Run one forward over the scheduled tokens; return the outputs of requests that changed (only
        those that finished with finished_only: building outputs costs host time at large batches, and those of
        the running requests in `watch` too: a caller streaming one request among many, LLM.stream).
        A request whose own input failed in the step (a logits processor that left no token allowed, or
        raised), or whose sequence holds the whole KV pool and still does not fit (a KV policy whose max_slots
        under-reports: the scheduler's Batch.failed), is aborted alone: its output is among those returned,
        finished, with `error` set (a lmforge.errors.RequestError naming it); the step goes on for the others,
        whose outputs are what they would be without it. LLM's methods and AsyncEngine's streams raise that error.
        The model runs in eval mode, whatever mode a trainer sharing it left it in (restored after), and in
        its own dtype: an autocast around the call (a Trainer's evaluation, an RL source's begin_step) does not
        reach the engine, whose outputs would otherwise depend on where it is called from."""
        self._sync_adapters()
        with eval_mode(self.model), torch.autocast(self.device.type, enabled=False):
            return self._step(finished_only, watch)

    def _sync_adapters(self) -> None:
        """LoRA adapters switched off or on (lmforge.adapt.adapters_disabled: a LoRA run's reference) or
        rescaled change the model's function as new weights do: with no request running that is
        update_weights() (cached prefixes and the backends built with the old setting go); while requests run
        (their keys came from the other setting) it is refused."""
        if not getattr(self.runner, "adapters_changed", lambda: False)():
            return
        if self.requests:
            raise LmforgeError(f"LoRA adapters were switched on or off (or rescaled) while {len(self.requests)} "
                               "request(s) ran with the other setting; switch them between generations")
        self.update_weights()

    def _step(self, finished_only: bool, watch: Collection[str] = ()) -> list[RequestOutput]:
        """Launch the next step, then read the pending one (async scheduling: lmforge.infer.pending) and
        the new one unless it overlaps the next. Outputs are built once, after both."""
        prev, self._pending = self._pending, None
        changed: dict[str, Request] = {}
        try:
            step = self._launch(prev, changed)
        except BaseException:
            self._pending = prev  # its tokens are still the sequences' next ones: read them next time
            raise
        if prev is not None:
            self._finish(prev, changed)
        if step is not None and step.overlap:
            self._pending = step
        elif step is not None:
            self._finish(step, changed)
        outs = []
        for req in changed.values():
            done = req.finished
            if done:
                self.requests.pop(req.request_id, None)
            if done or req.params.output_kind != "final" and (not finished_only or req.request_id in watch):
                outs.append(req.output())
        return outs

    def _launch(self, prev: Launched | None, changed: dict[str, Request]) -> Launched | None:
        """Schedule a step and queue its forward and sampling on the device (None: nothing to run).
        With prev pending, decode inputs that are prev's samples are copied on the device. Requests the
        scheduler found can never fit in the pool fail (into `changed`)."""
        if self.kv_policy is not None:  # evictions first: this step's slots follow them (kv.policy)
            self.kv_policy.plan(self.scheduler.running, self.scheduler.preempt_for)  # (no room: preemptions)
        batch = self.scheduler.next_batch(idle=prev is None)
        for seq in batch.preempted:  # its cache state went with its blocks: recomputed from its first token
            self._cache_event("preempt", seq.seq_id)
            if self.draft_head is not None:  # the head's entries went too: its features are handed again
                self.draft_head.preempt(seq)
        if self.draft_head is not None:  # new sequences on a prefix hit: their features resume there
            self.draft_head.resume_hits(batch)
        for seq, need in batch.failed:  # it holds the whole pool and still does not fit: it never will
            seq.request.error = unfit_error(self, seq, need)
            self._abort(seq.request)
            changed[seq.request.request_id] = seq.request
        if not batch.chunks:
            if prev is None and self.scheduler.has_work():
                raise LmforgeError("the scheduler could not fit any sequence in the KV pool; raise num_kv_tokens")
            return None
        for own in (self.draft_model, self.draft_head):  # copy-on-write copies apply to the draft's cache too
            if own is not None:
                own.copy_blocks(batch.copies)
        if self.make_drafter is not None:  # requests with a drafting strategy extend their chunks
            draft_step(self, batch)
        if self.kv_policy is not None:  # new sequences' policy state; the score hook where it observes
            self.kv_policy.begin_step(batch)
        # decodes first, shortest context first (caches that gather blocks pad less per group of rows)
        batch.chunks.sort(key=lambda c: (c[1] != 1, len(c[0].block_table) if c[1] == 1 else 0))
        rows, extra = sampling_rows(batch, self._rows), prompt_rows(batch)
        late = prev.late_ids(batch) if prev is not None else None
        hidden = self.hidden.ask(batch) if self.hidden is not None else None
        sampled = self.runner.execute(batch, rows, self.vocab_limit, extra, hidden, late)
        if self.scheduler.snapshots is not None:  # states where prefill chunks were cut for them
            self.runner.cache.save_snapshots(marked(batch.chunks))
        sampled.to_host()  # queued before the next step: reading it later waits for this step only
        if extra:
            self._record_prompt_logprobs(batch, extra, sampled.extra)
        for seq, n in batch.chunks:
            seq.num_computed += n
        step = Launched(batch, rows, sampled, self.async_scheduling and overlaps(batch, rows, extra))
        if step.overlap:
            step.hold_tokens()
            sampled.logits = sampled.full = None  # (M, V), for strategies only: not kept alive a step longer
            for seq, _ in batch.chunks:  # full blocks of known tokens: the next schedule may hit them, as in sync
                self._register_blocks(seq)
        return step

    def _finish(self, step: Launched, changed: dict[str, Request]) -> None:
        """Read a launched step's tokens (the step's one device->host sync) and append them: forks after a
        prefill, strategies, prefix-block registration; the requests that changed go into `changed`."""
        batch, rows, sampled = step.batch, step.rows, step.sampled
        tokens, lps, top_values, top_ids = sampled.read()
        top = (top_values, top_ids) if top_values is not None else None
        stale = step.stale()
        samples_of: dict[int, int] = {}
        claimed: dict[int, tuple[Sequence, list[int]]] = {}
        failed = sampled.failed or {}
        if sampled.features is not None:  # every position's features; a drafted chunk's: its strategy verifies
            for seq, n in batch.chunks:  # (before any fork: forks copy them)
                if seq.seq_id in sampled.features and seq.seq_id not in stale and not _claims(seq):
                    seq.features.push(seq.num_computed - n, sampled.features[seq.seq_id])
        for r, (c, _, _) in enumerate(rows):
            seq = batch.chunks[c][0]
            if step.overlap:
                seq.inflight -= 1
            if seq.seq_id in stale:
                continue
            changed[seq.request.request_id] = seq.request
            if r in failed and not seq.request.aborted:  # its own input failed: it ends, the step goes on
                seq.request.error = failed[r]
                self._abort(seq.request)
            if seq.request.aborted:  # (its other rows of this step too)
                continue
            if _claims(seq):
                claimed.setdefault(seq.seq_id, (seq, []))[1].append(r)
                continue
            j = samples_of[seq.seq_id] = samples_of.get(seq.seq_id, -1) + 1
            if j == 0 and not seq.request.forked:
                self._fork(seq)
            target = seq if j == 0 else seq.request.seqs[j]
            if sampled.hidden is not None:
                target.hidden = sampled.hidden[r]
            k = target.params.logprobs
            self.accept(target, tokens[r], lps[r] if lps else None,
                        dict(zip(top[1][r][:k], top[0][r][:k])) if k and top else {})
        for seq, idx in claimed.values():
            seq.request.strategy.on_logits(self, seq, idx, sampled)
        for seq, _ in batch.chunks:  # after strategies cut rejected drafts: only verified tokens are named
            self._register_blocks(seq)
            if not seq.params.max_tokens and seq.num_computed == len(seq.tokens) and seq.finish is None:
                seq.finish = "length"  # a score-only request: its prompt is computed (and its log-probs read)
                self.scheduler.finish(seq)
                changed[seq.request.request_id] = seq.request
            elif self.window and seq.status == Status.RUNNING:  # the next query sits at num_computed; a draft
                # model's next catch-up may start one token earlier (its last draft's key is never written)
                lag = 1 if self.draft_model is not None else 0
                self.pool.drop_behind(seq.block_table, seq.num_computed - self.window + 1 - lag)

    def _record_prompt_logprobs(self, batch, extra: Extra, logits: torch.Tensor) -> None:
        """Append each extra row's entry to its request (rows come in position order; the row at
        position p is prompt token p + 1's)."""
        seqs = [batch.chunks[c][0] for c, _ in extra]
        # (prompt tokens: a score-only sequence does not hold its last one)
        targets = [s.request.prompt_ids[s.num_computed + batch.chunks[c][1] - back]
                   for s, (c, back) in zip(seqs, extra)]
        entries = logprob_entries(logits, targets, [s.params.prompt_logprobs for s in seqs], self.vocab_limit)
        for seq, entry in zip(seqs, entries):
            seq.request.prompt_logprobs.append(entry)

    def _rows(self, seq: Sequence, n: int):
        """(tokens back from the chunk's end, row) of every logits row this chunk needs."""
        req = seq.request
        if not req.params.max_tokens:  # score-only: nothing is sampled
            return []
        if _claims(seq):
            rows = req.strategy.rows(seq, n)
            for _, row in rows:  # (a strategy reads the logits, not the draw: it comes from the engine's stream,
                if row.generator is None and not row.params.greedy:  # never torch's nor a seeded request's own)
                    row.generator = self.rng
            return rows
        if seq.row is None:  # (sample 0's generator: seq's own)
            seq.row = self._row(seq, seq.index, seq.generator)
        if not req.forked:  # the first sample of each of the n sequences comes from these logits
            return [(0, seq.row)] + [(0, self._row(seq, j, g)) for j, g in enumerate(req.generators[1:], 1)]
        return [(0, seq.row)]

    @staticmethod
    def _row(seq: Sequence, index: int, generator):
        """The sampler's Row of sample `index` (seq's own, or one drawing its first token from seq's logits)."""
        row = row_for(seq, generator)
        if seq.params.logits_processors:  # (per-sample instances of factory entries: Request.processors_for)
            row.processors = seq.request.processors_for(index)
        return row

    def _generator(self, params: SamplingParams, j: int) -> torch.Generator | None:
        """Sample j's random stream: its own under a seed, else the engine's shared one (None: greedy draws nothing)."""
        if params.greedy:
            return None
        if params.seed is None:
            return self.rng
        return torch.Generator(device=self.device).manual_seed(seed_for(params.seed, j))

    def _sequence(self, req: Request, index: int, tokens: list[int]) -> Sequence:
        gen = req.generators[index] if index < len(req.generators) else None
        seq = Sequence(next(self._seq_ids), req, index, tokens, gen)
        seq.decoder = StreamDecoder(self.tokenizer, self.special_ids if req.params.skip_special_tokens else (),
                                    req.context)
        return seq

    def _fork(self, parent: Sequence) -> None:
        """The request's other samples: copies of the parent that share its blocks (copy-on-write)."""
        after = parent
        for j in range(1, parent.request.params.n):
            after = self.fork(parent, j, after)
        parent.request.forked = True

    def fork(self, parent: Sequence, index: int, after: Sequence | None = None) -> Sequence:
        """A copy of parent (tokens, cache blocks shared copy-on-write) running right behind `after`."""
        if self.kv_policy is not None:  # the children share the parent's compacted blocks
            self._register_blocks(parent)  # its lossless prompt blocks first: once it evicts they are never named
            self.kv_policy.apply(parent)
        child = self._sequence(parent.request, index, list(parent.tokens))
        child.num_computed, child.block_keys = parent.num_computed, list(parent.block_keys)
        child.evicted, child.pos_shift = parent.evicted, parent.pos_shift
        child.features = parent.features.copy() if parent.features is not None else None
        child.block_table = self.pool.fork(parent.block_table)
        parent.request.seqs.append(child)
        self.scheduler.add_running(child, after or parent)
        self._cache_event("fork", parent.seq_id, child.seq_id)
        return child

    def _released(self, seq: Sequence) -> None:
        """A sequence finished, was aborted or dropped (Scheduler.on_release): per-sequence state goes."""
        forget(seq.row)  # its penalties' (V,) state (lmforge.infer.sampler.token_history)
        if hasattr(seq.request.strategy, "release"):  # a drafter's per-sequence state (speculative decoding)
            seq.request.strategy.release(seq)
        if self.draft_model is not None:
            self.draft_model.forget(seq)
        self._cache_event("release", seq.seq_id)

    def _cache_event(self, name: str, *seq_ids: int) -> None:
        """Tell a cache that keeps per-sequence state (a KV policy's scores, an SSM's recurrent state; keyed by
        AttnMetadata.seq_ids_host) that a sequence was forked (`cache.fork(parent, child)`: the child starts
        from the parent's state), released (`cache.release(seq_id)`) or preempted (`cache.preempt(seq_id)`: it
        keeps its id and is prefilled again from its first token, so state built from its tokens is stale)."""
        fn = getattr(getattr(self.runner, "cache", None), name, None)
        if fn is not None:
            fn(*seq_ids)
        if self.kv_policy is not None:  # per-sequence policy state: the same events
            getattr(self.kv_policy, name)(*seq_ids)

    def accept(self, seq: Sequence, tok: int, logprob: float | None = None, top: dict | None = None) -> None:
        """Append one generated token (with its logprob and top-k when the request asks for them)."""
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob
            # a filtered distribution (processed log-probs under top-k) ranks tokens it gave no mass: not listed
            seq.top.append({i: v for i, v in top.items() if v != float("-inf")} if top else {})
        if seq.request.first_token_time is None:
            seq.request.first_token_time = time.perf_counter()
        seq.append(tok, seq.request.eos, self.stream_len)
        if seq.finish is not None:
            self._register_blocks(seq)  # its blocks stay cached for later prompts with the same prefix
            self.scheduler.finish(seq)

    def _register_blocks(self, seq: Sequence) -> None:
        """Name every newly filled block by its prefix key, so later requests can reuse it."""
        # a token still on the device (async scheduling) may already be computed: name known tokens only
        bs = self.pool.block_size
        full = min(seq.num_computed, len(seq.tokens)) // bs
        # (a sequence that evicted keys computed every later key over a lossy context: never named)
        if self.draft_head is not None and seq.features is not None:  # a paged head's entries and features
            full = min(full, self.draft_head.caught_up(seq))  # must be in a block before it is named
        if (len(seq.block_keys) >= full or not self.pool.prefix_caching or seq.status == Status.FINISHED
                or seq.evicted):
            return
        parent = seq.block_keys[-1] if seq.block_keys else None
        keys = self.pool.block_keys(seq.tokens[: full * bs], parent, len(seq.block_keys))
        for i, key in enumerate(keys, start=len(seq.block_keys)):
            self.pool.register(seq.block_table[i], key)
        seq.block_keys += keys

    # statistics ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Pool and scheduler counters. kv_utilization: tokens stored in the distinct blocks in use / their
        slots, each shared block (prefix hits, n samples, beams) counted once, so it is at most 1
        (lmforge.infer.blocks); *_at_peak: when the most blocks were in use (peak_used_blocks); evicted_tokens:
        keys a KV policy dropped, in kv_compactions compactions (lmforge.infer.kv.policy); requests: running or
        queued, waiting / running: sequences waiting for a step and in the running batch (a server's /metrics)."""
        p = self.pool
        return {"num_blocks": p.num_blocks, "used_blocks": p.num_used, "peak_used_blocks": p.peak_used,
                "kv_utilization": p.utilization, "kv_utilization_at_peak": p.peak_utilization,
                "prefix_hit_rate": p.stats.hit_rate, "prefix_hit_blocks": p.stats.hit_blocks,
                "preemptions": self.scheduler.num_preemptions, "requests": len(self.requests),
                "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "evicted_tokens": self.kv_policy.evicted_tokens if self.kv_policy is not None else 0,
                "kv_compactions": self.kv_policy.compactions if self.kv_policy is not None else 0}


def _claims(seq: Sequence) -> bool:
    """Whether the request's strategy (beam search, speculative decoding) handles this sequence's logits."""
    strategy = seq.request.strategy
    return strategy is not None and strategy.claims(seq)
