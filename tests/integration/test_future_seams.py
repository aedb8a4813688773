"""Sketches of the work that comes next, built on public seams only (no private names, no monkeypatching, no copy
of the engine's or the Trainer's logic): an OpenAI-style streaming server on AsyncEngine, weight-only int8
quantization served by the Engine, a new post-training objective on the Trainer, and a new KV policy. Each sketch
asserts real values against a plain reference; a sketch that needed an internal is a seam to fix in lmforge."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge as lf
from lmforge.align.data import RecordError, pad_batch
from lmforge.align.dpo import PAIR
from lmforge.align.logprobs import ModelAux, batch_logps, masked_mean
from lmforge.errors import ConfigError, DataError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.policy import KVPolicy
from lmforge.model.layers.attention import attend_with
from lmforge.model.structure import tied_weights
from lmforge.model.surgery import matches, outer_layers, register_base_layer, replace_module
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.train.objective import Stateless

TEXT = "the cat sat on the mat. the dog sat on the log. "


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model(tok) -> lf.Transformer:
    """A tiny Llama-style byte model trained for a second on TEXT, so that its greedy text is readable."""
    torch.manual_seed(0)
    m = lf.Transformer(lf.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                      max_seq_len=128))
    data = torch.tensor(tok.encode(TEXT * 20))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a model this small trains ~3x faster on one thread than on two contended ones)
    with torch.random.fork_rng():
        for _ in range(80):
            starts = torch.randint(0, len(data) - 33, (8,))
            x = torch.stack([data[s:s + 33] for s in starts])
            loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.5
    return m.eval()


# a) an OpenAI-style streaming completion on AsyncEngine ----------------------------------------------------------

async def completion_chunks(engine: AsyncEngine, prompt: str, params: lf.SamplingParams):
    """OpenAI's `/v1/completions` with `stream=true`: one chunk per engine output holding the new text, its
    tokens' log-probs (`logprobs.token_logprobs`, `logprobs.tokens` as ids) and, on the last chunk, the finish
    reason and the usage. A 'delta' request hands each output only what is new: no diffing here."""
    rid = await engine.add_request(prompt, params.derived(output_kind="delta"))
    async with contextlib.aclosing(engine.stream(rid)) as outs:  # leaving early aborts the request
        async for out in outs:
            sample = out.outputs[0]
            chunk = {"id": f"cmpl-{rid}", "object": "text_completion",
                     "choices": [{"index": 0, "text": sample.text, "finish_reason": sample.finish_reason,
                                  "logprobs": None if sample.logprobs is None else
                                  {"tokens": list(sample.token_ids), "token_logprobs": list(sample.logprobs)}}]}
            if out.finished:
                chunk["usage"] = {k: out.usage[k] for k in ("prompt_tokens", "completion_tokens")}
            yield chunk


def test_openai_style_streaming_two_requests_one_cancelled(model, tok):
    engine = Engine(model, tok, EngineConfig(block_size=4, num_kv_tokens=512))
    stop = lf.SamplingParams(temperature=0, max_tokens=40, stop=("mat",), logprobs=1)
    drawn = []  # one entry per token the engine draws for the request to be cancelled

    def count(output_ids, logits):
        drawn.append(len(output_ids))
        return logits

    endless = lf.SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, logits_processors=(count,))
    offline = lf.LLM(model, tok).generate(["the dog"], stop)[0]
    assert offline.text == " sat on the " and offline.finish_reason == "stop"

    async def serve():
        server = AsyncEngine(engine)
        got: dict[str, list] = {"stop": [], "cancelled": []}

        async def read(name, prompt, params, cancel_after=None):  # a response streaming to one client
            async with contextlib.aclosing(completion_chunks(server, prompt, params)) as chunks:
                async for chunk in chunks:
                    got[name].append(chunk)
                    if cancel_after is not None and len(got[name]) == cancel_after:
                        await asyncio.sleep(3600)  # the client hangs: its task is cancelled below

        cancelled = asyncio.create_task(read("cancelled", "the cat", endless, cancel_after=3))
        finished = asyncio.create_task(read("stop", "the dog", stop))
        while len(got["cancelled"]) < 3:
            await asyncio.sleep(0.001)
        cancelled.cancel()  # a client disconnect: the stream leaves, the request is aborted
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        await finished
        for _ in range(1000):  # the abort is applied between steps: wait for the step loop to go idle
            if server.stats()["requests"] == 0:
                break
            await asyncio.sleep(0.001)
        stats = server.stats()  # (before shutdown, which would abort whatever is left)
        await server.shutdown()
        return got, stats

    got, stats = asyncio.run(serve())
    # the cancelled request was aborted mid-stream (not run to its 80 tokens) and gave its blocks back
    assert len(got["cancelled"]) == 3 and all(c["choices"][0]["finish_reason"] is None for c in got["cancelled"])
    assert len(drawn) < 10  # (3 chunks, and the step in flight when the task was cancelled)
    assert stats["requests"] == 0 and stats["streams"] == 0 and stats["used_blocks"] == 0
    assert engine.pool.num_free == engine.pool.num_blocks
    # the finished request: text cut before its stop string, per-token log-probs and usage as offline
    chunks = got["stop"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    ids = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    lps = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert text == offline.text and ids == list(offline.token_ids)
    assert lps == pytest.approx(offline.logprobs, abs=1e-5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[0]
    assert chunks[-1]["usage"] == {"prompt_tokens": len(tok.encode("the dog")), "completion_tokens": len(ids)}


# b) weight-only int8 quantization served by the Engine ----------------------------------------------------------

class QuantLinear(nn.Module):
    """Weight-only int8: W ~ q * s with q = round(W / s) in [-127, 127] and one scale s per output channel (row),
    s = max |W_row| / 127 (absmax, as LLM.int8's vector-wise quantization, Dettmers et al. 2022, without the
    outliers). Integer in_features / out_features make it a linear layer to lmforge.model.surgery.outer_layers."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None)
        w = lin.weight.detach().float()
        q.scales = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127  # (out, 1)
        q.qweight = torch.round(w / q.scales).clamp(-127, 127).to(torch.int8)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        return q

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_linears(model: nn.Module, targets: tuple[str, ...] = ("*",)) -> list[str]:
    """In place, from outside the model, through the seams apply_lora uses too (lmforge.model.surgery): every
    Linear matching `targets` (PEFT-style name patterns) becomes a QuantLinear, but a tied one (GPT-2's lm_head
    shares the embedding's weight). Returns the names replaced."""
    tied = {name.rpartition(".")[0] for group in tied_weights(model) for name in group}
    names = [n for n, m in outer_layers(model).items() if isinstance(m, nn.Linear) and matches(n, targets)
             and n not in tied]
    for name in names:
        replace_module(model, name, QuantLinear.from_linear(model.get_submodule(name)))
    return names


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The reference: a float model whose Linears hold exactly the weights the int8 codes stand for."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data.copy_(m.dequantized())
            if m.bias is not None:
                lin.bias.data.copy_(m.bias)
            replace_module(ref, name, lin.requires_grad_(False))
    return ref


def greedy_by_recompute(model: nn.Module, prompt: list[int], n: int, cache=None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs by running the whole sequence at every step (cache: an attention object
    given to the model, which sees the whole sequence at each call)."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([ids]), cache=cache)[0, -1].log_softmax(-1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
    return ids[len(prompt):], lps


@pytest.mark.parametrize("preset,replaced", [("gpt2-small", 2 * (4 + 2)),  # tied lm_head stays float
                                             ("llama-tiny", 2 * (4 + 3) + 1)])  # SwiGLU's gate, lm_head
def test_int8_weight_only_model_generates_as_its_dequantized_weights(tok, preset, replaced):
    torch.manual_seed(0)
    cfg = lf.ModelConfig.preset(preset, vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                max_seq_len=128, init_std=0.1)
    model = lf.Transformer(cfg).eval()
    float_model = copy.deepcopy(model)
    names = quantize_linears(model)
    assert "blocks.1.mlp.down" in names and len(names) == replaced
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in names)
    ref = dequantized_copy(model)
    prompt = tok.encode("the cat sat")
    greedy = lf.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = lf.LLM(model, tok, config=EngineConfig(block_size=4)).generate([prompt, "a dog"], greedy)
    want, want_lps = greedy_by_recompute(ref, prompt, 24)
    assert list(outs[0].token_ids) == want
    assert outs[0].logprobs == pytest.approx(want_lps, abs=1e-4)
    assert list(outs[1].token_ids) == greedy_by_recompute(ref, tok.encode("a dog"), 24)[0]
    served = lf.LLM(ref, tok, config=EngineConfig(block_size=4)).generate([prompt, "a dog"], greedy)
    assert [o.logprobs for o in outs] == [o.logprobs for o in served]  # bit for bit the float model's serving
    # and the rounding is real: the float model's log-probs of the same tokens differ
    with torch.no_grad():
        full = float_model(torch.tensor([prompt + want]))[0, len(prompt) - 1:-1].log_softmax(-1)
    float_lps = full.gather(-1, torch.tensor(want)[:, None])[:, 0]
    assert (float_lps - torch.tensor(want_lps)).abs().max() > 1e-4
    # the codes are what the engine served: the model's own int8 buffers, untouched
    assert model.blocks[0].attn.wq.qweight.dtype == torch.int8


def test_int8_model_saves_and_loads_through_the_base_layer_registry(tmp_path, tok):
    from lmforge.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = lf.ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                max_seq_len=128, init_std=0.1)
    model = lf.Transformer(cfg).eval()
    quantize_linears(model)
    register_base_layer("future-seams-int8", QuantLinear)  # (from_linear: load_model builds its shells)
    loaded = lf.LLM.load(save_checkpoint(tmp_path / "int8", 0, model), tokenizer=tok)
    wq = loaded.engine.model.blocks[0].attn.wq
    assert isinstance(wq, QuantLinear) and torch.equal(wq.qweight, model.blocks[0].attn.wq.qweight)
    greedy = lf.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = greedy_by_recompute(dequantized_copy(model), tok.encode("the cat"), 16)[0]
    assert list(loaded.generate(["the cat"], greedy)[0].token_ids) == want


# c) a new post-training objective, registered from outside lmforge ----------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SLiCConfig:
    delta: float = 1.0
    """the margin log pi(y+|x) - log pi(y-|x) must clear"""
    reg: float = 0.5
    """weight of the chosen completion's NLL (the paper's regularization toward the SFT targets)"""

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ConfigError(f"slic.delta must be > 0, got {self.delta}")


class SLiCObjective(Stateless):
    """SLiC-HF's rank calibration loss (Zhao et al. 2023, "SLiC-HF", Eq. 1 with the SFT regularizer):

        loss = mean_b max(0, delta - log pi(y+|x) + log pi(y-|x)) + reg * NLL(y+ | x)

    on preference batches (chosen_* / rejected_* keys, summed log-probs of the completion tokens). No reference."""

    Config = SLiCConfig

    def __init__(self, cfg: SLiCConfig | None = None):
        self.cfg = cfg or SLiCConfig()

    def loss(self, model, batch):
        aux = ModelAux(model)
        (lp_c, lp_r), (tok_c, _), (mask_c, _) = batch_logps(model, batch, PAIR, aux=aux)
        hinge = (self.cfg.delta - lp_c + lp_r).clamp_min(0).mean()
        nll = -masked_mean(tok_c, mask_c)
        metrics = {"hinge": hinge.detach(), "nll": nll.detach(), "margin": (lp_c - lp_r).detach().mean()}
        return aux.add(hinge + self.cfg.reg * nll, metrics)


def test_a_registered_objective_trains_through_the_post_training_run(tmp_path, model, tok):
    from lmforge.align.config import OBJECTIVES, ObjectiveSpec, register_objective

    register_objective("slic", ObjectiveSpec(f"{__name__}:SLiCObjective", "preference", config=SLiCConfig))
    try:
        _train_slic(tmp_path, model, tok)
    finally:  # (the registry is the process's: later tests see every registered objective)
        OBJECTIVES.pop("slic")


def _train_slic(tmp_path, model, tok) -> None:
    from lmforge.align.config import config_class
    from lmforge.checkpoint import save_checkpoint
    from lmforge.train.posttrain import posttrain

    init = save_checkpoint(tmp_path / "base", 0, model, tokenizer=tok)
    pairs = [{"prompt": f"the {a} sat on the", "chosen": f" {b}.", "rejected": f" {c}."}
             for a, b, c in [("cat", "mat", "log"), ("dog", "log", "mat")] * 8]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = config_class("slic")(init=str(init), run_dir=str(tmp_path / "run"), max_steps=16, log_every=1,
                               eval_every=16, ckpt_every=16, progress=False, plot=False,
                               optim=lf.OptimConfig(lr=1e-2, warmup_steps=0), slic={"delta": 2.0},
                               data={"train": [str(tmp_path / "pairs.jsonl")], "template": "plain",
                                     "seq_len": 32, "batch_size": 8, "val_fraction": 0.25})
    assert cfg.slic == SLiCConfig(delta=2.0)  # the objective's own options, as [slic] in a TOML file
    result = posttrain(cfg)
    evals = [r for r in result.history if "val_loss" in r]  # before the first step and after the last
    # the base model learned "the cat sat on the mat.": held-out "dog ... log" pairs start against it (margin < 0)
    assert evals[0]["step"] == 0 and evals[0]["val_margin"] < 0 and evals[0]["val_hinge"] > 2.0
    assert result.final_eval["val_hinge"] < 0.1 and result.final_eval["val_margin"] > 2.0  # they clear delta now
    assert result.final_eval["val_loss"] < 0.5 * evals[0]["val_loss"]
    assert json.loads((result.checkpoint / "config.json").read_text())["objective"] == "slic"


# c') a new record kind, registered from outside lmforge, and an objective that trains on it -----------------------

def encode_ranked(enc, rec: dict, where: str, fit) -> tuple:
    """Data kind 'ranked': {"prompt": ..., "completions": [best, ..., worst]} -> one example per completion,
    best first (the run's Encoder renders each as a prompt/completion record; fit truncates each)."""
    completions = rec.get("completions")
    if not (isinstance(completions, list) and len(completions) >= 2 and len(set(map(str, completions))) == len(
            completions)):
        raise RecordError("bad_completions", f"{where}: field 'completions' must list at least 2 different "
                                             "completions, best first")
    return tuple(fit(enc.prompt_completion(rec.get("prompt"), c, where, "completions")) for c in completions)


def check_ranked(items: list[tuple]) -> None:
    sizes = sorted({len(item) for item in items})
    if len(sizes) > 1:
        raise DataError(f"ranked records list {sizes} completions; give every record the same number")


def collate_ranked(items: list[tuple], data, options) -> dict[str, torch.Tensor]:
    """(B, K, T) input_ids / targets / loss_mask: record b's completions best first along K, so a data-parallel
    run's rows (records) keep their lists whole."""
    flat = pad_batch([ex for item in items for ex in item])  # (B*K, T)
    return {k: v.unflatten(0, (len(items), -1)) for k, v in flat.items()}


@dataclass(frozen=True, kw_only=True)
class ListMLEConfig:
    scale: float = 1.0
    """the Plackett-Luce scores are scale * log pi(y_k | x)"""


class ListMLEObjective(Stateless):
    """ListMLE (Xia et al. 2008, "Listwise Approach to Learning to Rank", Eq. 8): the negative log-likelihood of the
    given order y_1 > ... > y_K under the Plackett-Luce model of scores s_k = scale * log pi(y_k | x) (summed over
    the completion's tokens):

        loss = mean_b sum_k [ logsumexp_{j >= k} s_j - s_k ]

    on 'ranked' batches ((B, K, T) keys). `ordered`: the share of lists whose scores already fall strictly."""

    Config = ListMLEConfig

    def __init__(self, cfg: ListMLEConfig | None = None):
        self.cfg = cfg or ListMLEConfig()

    def loss(self, model, batch):
        B, K, _ = batch["input_ids"].shape
        aux = ModelAux(model)
        (lp,), _, _ = batch_logps(model, {k: batch[k].flatten(0, 1) for k in ("input_ids", "targets", "loss_mask")},
                                  aux=aux)
        s = self.cfg.scale * lp.view(B, K)
        tails = s.flip(1).logcumsumexp(1).flip(1)  # (B, K): logsumexp over s_k .. s_K
        loss = (tails - s).sum(1).mean()
        ordered = (s[:, :-1] > s[:, 1:]).all(1).float().mean()
        return aux.add(loss, {"ordered": ordered.detach()})


def test_a_registered_data_kind_trains_a_registered_objective_through_the_post_training_run(tmp_path, model, tok):
    from lmforge.align.config import (DATA_KINDS, LM_KEYS, OBJECTIVES, DataKindSpec, ObjectiveSpec,
                                      register_data_kind, register_objective)

    register_data_kind("ranked", DataKindSpec(f"{__name__}:encode_ranked", f"{__name__}:collate_ranked",
                                              keys=LM_KEYS, check=f"{__name__}:check_ranked"))
    register_objective("listmle", ObjectiveSpec(f"{__name__}:ListMLEObjective", "ranked"))
    try:
        train_listmle(tmp_path, model, tok)
    finally:
        OBJECTIVES.pop("listmle")
        DATA_KINDS.pop("ranked")


def train_listmle(tmp_path, model, tok) -> None:
    from lmforge.align.config import config_class
    from lmforge.checkpoint import save_checkpoint
    from lmforge.train.posttrain import posttrain

    init = save_checkpoint(tmp_path / "base", 0, model, tokenizer=tok)
    # the base model learned "the cat sat on the mat." and "the dog ... log.": each list ranks its learned ending last
    lists = [{"prompt": f"the {a} sat on the", "completions": [" rug.", f" {b}.", f" {c}."]}
             for a, b, c in [("cat", "log", "mat"), ("dog", "mat", "log")] * 8]
    lines = [json.dumps(r) + "\n" for r in lists] + ['{"prompt": "the cat", "completions": [" sat"]}\n']
    (tmp_path / "ranked.jsonl").write_text("".join(lines))
    cfg = config_class("listmle")(init=str(init), run_dir=str(tmp_path / "run"), max_steps=16, log_every=1,
                                  eval_every=16, ckpt_every=16, progress=False, plot=False,
                                  optim=lf.OptimConfig(lr=1e-2, warmup_steps=0), listmle={"scale": 2.0},
                                  data={"train": [str(tmp_path / "ranked.jsonl")], "template": "plain",
                                        "seq_len": 32, "batch_size": 8, "val_fraction": 0.25, "on_error": "skip"})
    assert cfg.listmle == ListMLEConfig(scale=2.0)
    result = posttrain(cfg)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["used"] == 16 and report["held_out"] == 4 and report["rejected"] == {"bad_completions": 1}
    evals = [r for r in result.history if "val_loss" in r]  # before the first step and after the last
    assert evals[0]["step"] == 0 and evals[0]["val_ordered"] == 0.0 and evals[0]["val_loss"] > 10.0
    assert result.final_eval["val_ordered"] == 1.0 and result.final_eval["val_loss"] < 0.5
    assert json.loads((result.checkpoint / "config.json").read_text())["objective"] == "listmle"


# d) a new KV policy on the engine --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EveryOtherBlock(KVPolicy):
    """Once the prompt is computed, keep of its keys older than the last `recent` only the even-numbered runs of
    `block` positions (run 0 holds the attention sinks: Xiao et al. 2023), and every key after. Like SnapKV it
    compresses once, so the first token comes from the whole prompt; a prompt of at most block + recent tokens
    is kept whole. Slots are positions until the one compaction (ordered slots, nothing evicted before it)."""

    block: int = 4
    recent: int = 8

    def dropped(self, prompt_len: int) -> list[int]:
        return [p for p in range(prompt_len - self.recent) if (p // self.block) % 2 == 1]

    def start(self, seq, layout):
        return {"prompt_len": len(seq.tokens), "done": False}

    def plan(self, seq, state):
        drop = set(self.dropped(state["prompt_len"]))
        if state["done"] or not drop or seq.num_computed < state["prompt_len"]:
            return None
        return [s for s in range(seq.num_slots) if s not in drop]

    def compacted(self, state, keep):
        state["done"] = True


class KeptKeys:
    """The reference attention for a full recompute, `model(ids, cache=KeptKeys(...))`: causal, except that the
    queries from position `prompt_len` on do not see the prompt keys at `dropped`."""

    length = 0  # (the model reads positions from here: 0.. for the whole sequence)

    def __init__(self, prompt_len: int, dropped: list[int]):
        self.prompt_len, self.dropped = prompt_len, dropped

    def attend(self, layer, q, k, v, spec, meta=None):
        T = k.shape[2]
        pos = torch.arange(T)
        mask = pos[None, :] <= pos[:, None]  # (T queries, T keys)
        gone = torch.zeros(T, dtype=torch.bool)
        gone[self.dropped] = True
        mask &= ~(gone[None, :] & (pos[:, None] >= self.prompt_len))
        return attend_with(q, k, v, mask[None, None], spec)

    def advance(self, T: int) -> None:
        pass


def test_a_new_kv_policy_generates_as_a_recompute_that_masks_what_it_evicts(model, tok):
    from lmforge.infer.kv.policy import POLICIES, policy_from_spec, register_policy

    register_policy("every_other", EveryOtherBlock)
    try:  # the command line's --kv-policy builds it by name now
        policy = policy_from_spec("every_other:block=4,recent=8")
    finally:
        POLICIES.pop("every_other")
    assert policy == EveryOtherBlock(block=4, recent=8)
    prompts = [TEXT[:30], TEXT[:37], "the cat"]  # 30, 37 tokens: blocks evicted; 7: kept whole
    greedy = lf.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    llm = lf.LLM(model, tok, config=EngineConfig(block_size=4, kv_policy=policy))
    outs = llm.generate(prompts, greedy)
    plain = lf.LLM(model, tok, config=EngineConfig(block_size=4)).generate(prompts, greedy)
    for prompt, out, full in zip(prompts, outs, plain):
        ids = tok.encode(prompt)
        dropped = policy.dropped(len(ids))
        want, want_lps = greedy_by_recompute(model, ids, 20, KeptKeys(len(ids), dropped))
        assert list(out.token_ids) == want and out.logprobs == pytest.approx(want_lps, abs=2e-4)
        assert out.token_ids[0] == full.token_ids[0]  # the first token is computed from the whole prompt
        if not dropped:  # nothing evicted: a plain recompute, bit for bit what the engine gives without a policy
            assert out.logprobs == full.logprobs and list(out.token_ids) == greedy_by_recompute(model, ids, 20)[0]
    evicted = [len(policy.dropped(len(tok.encode(p)))) for p in prompts]
    assert evicted == [10, 13, 0] and llm.engine.stats()["evicted_tokens"] == sum(evicted)
    assert llm.engine.stats()["kv_compactions"] == 2
    assert any(a.token_ids != b.token_ids or a.logprobs != b.logprobs for a, b in zip(outs, plain))
    # again, from the prefix cache (lossless prompt blocks, then the same one compaction), and as forked samples
    again = llm.generate(prompts[:1], greedy.derived(n=2))[0]
    assert again.metrics["num_cached_tokens"] > 0
    for sample in again.outputs:
        assert sample.token_ids == outs[0].token_ids
        assert sample.logprobs == pytest.approx(outs[0].logprobs, abs=1e-5)
