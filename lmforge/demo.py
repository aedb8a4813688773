"""The main job, end to end on an embedded corpus: `lmforge demo`.

Corpus: the source files of Python's own standard library (every Python installation has them, so
nothing is downloaded). Steps: train a BPE tokenizer on it, tokenize into shards, train a small
Llama-style model while the progress bar shows loss falling, evaluate validation loss and
bits-per-byte, then sample from the trained model.
"""

from __future__ import annotations

import math
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import check, coerce_fields
from lmforge.errors import ConfigError

MARKER = ".lmforge-demo"
"""the file that marks a directory as the demo's own: only such a directory (or an empty one) is cleared for a
re-run, so `--out` pointed at a training run by mistake is refused instead of losing its checkpoints"""
VAL_FRACTION = 0.05
PROMPTS = ("def ", "class ")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: str = "runs/demo"
    """run directory (tokenizer, shards, checkpoints, metrics, loss.png)"""
    corpus_mb: float = 3.0
    """megabytes of standard-library source to use"""
    tokenizer: str = "bpe"
    """'bpe' (trained on the corpus) or 'byte'"""
    vocab_size: int = 2048
    """BPE vocabulary size (tokenizer 'bpe')"""
    steps: int = 600
    """training steps"""
    depth: int = 4
    """model depth; width = 64·depth (ModelConfig.from_depth)"""
    seq_len: int = 128
    """tokens per training sequence"""
    batch_size: int = 16
    """sequences per step"""
    lr: float = 3e-3
    """peak learning rate"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    samples: int = 2
    """samples printed at the end, prompted in turn by "def " and "class " (0: none)"""
    seed: int = 1337
    """seed of the training run and of the samples"""

    def __post_init__(self) -> None:
        coerce_fields(self, "demo")  # each field's type, named when wrong
        check(self.corpus_mb > 0, f"corpus_mb must be > 0, got {self.corpus_mb}")
        check(self.tokenizer in ("bpe", "byte"), f"tokenizer must be 'bpe' or 'byte', got {self.tokenizer!r}")
        check(self.steps > 0 and self.depth > 0, "steps and depth must be > 0")
        check(self.samples >= 0, f"--samples must be >= 0 (0 prints none), got {self.samples}")
        for flag, value in (("--seq-len", self.seq_len), ("--batch-size", self.batch_size), ("--lr", self.lr)):
            check(0 < value < math.inf, f"{flag} must be a positive number, got {value}")  # not model.max_seq_len's


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Source files of the running Python's standard library, sorted by path, max_bytes of them: the last file is
    cut at a line end (adding it whole could pass --corpus-mb by a 228 kB file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if not text.strip():
            continue
        data = text.encode()
        if total + len(data) > max_bytes:
            head = data[:max_bytes - total].decode("utf-8", errors="ignore")  # (a character cut in two dropped)
            text = head[:head.rfind("\n") + 1] or ("" if docs else text[:text.find("\n") + 1])  # a line at least
            if text:
                docs.append(text)
            break
        docs.append(text)
        total += len(data)
    return docs


def _tokenize(docs: list[str], cfg: DemoConfig, out: Path):
    from lmforge.data.shards import TokenShardWriter
    from lmforge.tokenizer.byte import ByteTokenizer

    if cfg.tokenizer == "bpe":
        from lmforge.tokenizer.train import train_bpe

        tok = train_bpe(iter(docs), vocab_size=cfg.vocab_size, special_tokens=["<|endoftext|>"])
    else:
        tok = ByteTokenizer()
    tok_path = tok.save(out / "tokenizer")
    shard = out / "data" / "stdlib.bin"
    with TokenShardWriter(shard, vocab_size=tok.vocab_size, tokenizer=str(tok_path.resolve()), doc_sep=tok.eot_id) as w:
        for d in docs:
            w.add_document(tok.encode(d))
        n = w.num_tokens
    return tok, shard, n


def claim_out_dir(out: str | Path) -> Path:
    """Make `out` the demo's directory: a new or empty one gets the marker; one holding the marker (or the demo's
    shard, data/stdlib.bin, as a demo's made before the marker) is a previous demo's, whose checkpoints and
    metrics log are cleared (the tokenizer and shards are rewritten). Anything else (a training run, a file, a
    path under a file: lmforge.utils.check_output_path) is refused before anything is written."""
    from lmforge.utils import check_output_path

    out = check_output_path(out, "--out", want="a new or empty directory")
    ours = (out / MARKER).is_file() or (out / "data" / "stdlib.bin").is_file()  # (the shard: a demo before the marker)
    if out.is_dir() and not ours and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and was not made by lmforge demo; give a new or empty directory "
                          "(another --out), so that nothing in it is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `lmforge demo`: a re-run with this --out replaces its checkpoints and log\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def check_corpus_size(cfg: DemoConfig, n_tokens: int, n_bytes: int) -> None:
    """Both splits of the corpus need a sequence of seq_len + 1 tokens (lmforge.train.data.open_splits): say so in
    the demo's own flags, with the --corpus-mb that would be enough."""
    need = cfg.seq_len + 1
    n_val = int(n_tokens * VAL_FRACTION)
    if min(n_val, n_tokens - n_val) < need:
        enough = need / VAL_FRACTION * n_bytes / n_tokens / 1e6  # bytes per token as measured on this corpus
        digits = 1 - math.floor(math.log10(enough))
        enough = math.ceil(enough * 10**digits) / 10**digits  # two significant digits, rounded up
        raise ConfigError(f"--corpus-mb {cfg.corpus_mb} gives {n_tokens:,} tokens, too few for a {VAL_FRACTION:.0%} "
                          f"validation split of one --seq-len {cfg.seq_len} sequence ({need} tokens); raise "
                          f"--corpus-mb to at least {enough:g} or lower --seq-len")


def run_demo(cfg: DemoConfig) -> dict:
    import lmforge as lf
    from lmforge.model.config import ModelConfig
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import DataConfig, TrainConfig
    from lmforge.utils import pick_device

    device = pick_device(cfg.device)  # a device this machine lacks fails now, not after the corpus and tokenizer
    out = claim_out_dir(cfg.out)
    t0 = time.perf_counter()
    docs = stdlib_corpus(int(cfg.corpus_mb * 1e6))
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"[1/4] corpus: {len(docs)} standard-library files, {n_bytes / 1e6:.1f} MB")
    tok, shard, n_tok = _tokenize(docs, cfg, out)
    print(f"[2/4] tokenizer: {cfg.tokenizer}, vocab {tok.vocab_size}; {n_tok:,} tokens "
          f"({n_bytes / n_tok:.2f} bytes/token) in {time.perf_counter() - t0:.0f}s")
    check_corpus_size(cfg, n_tok, n_bytes)
    model_cfg = ModelConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, max_seq_len=cfg.seq_len)
    tcfg = TrainConfig(
        model=model_cfg,
        data=DataConfig(train=(str(shard),), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                        val_fraction=VAL_FRACTION),
        optim=OptimConfig(lr=cfg.lr, warmup_steps=min(50, cfg.steps // 10), weight_decay=0.1, min_lr_ratio=0.05),
        run_dir=str(out), max_steps=cfg.steps, eval_every=max(1, cfg.steps // 4), eval_batches=8,
        log_every=10, ckpt_every=cfg.steps, seed=cfg.seed, device=device, resume=False)
    print(f"[3/4] training a {model_cfg.n_layers}-layer, {model_cfg.d_model}-wide model "
          f"({lf.Transformer(model_cfg).num_params() / 1e6:.1f}M parameters) for {cfg.steps} steps")
    result = lf.train(tcfg)
    print("[4/4] samples (temperature 0.8, top-k 50):" if cfg.samples else "[4/4] samples: none (--samples 0)")
    if cfg.samples:
        from lmforge.infer.llm import LLM
        from lmforge.infer.sampling import SamplingParams

        llm = LLM.load(result.checkpoint)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.samples)]  # prompt i samples from seed (seed, i)
        longest = max(len(llm.tokenizer.encode(p)) for p in prompts)
        room = max(min(96, llm.max_seq_len - longest), 1)  # a short --seq-len ends samples early: not worth a warning
        outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_k=50, max_tokens=room, seed=cfg.seed))
        for p, o in zip(prompts, outs):
            print("-" * 60)
            print(p + o.text)
        print("-" * 60)
    bpb = f", {result.final_val_bpb:.3f} bits/byte" if result.final_val_bpb else ""
    print(f"validation loss {result.final_val_loss:.3f}{bpb}; done in {time.perf_counter() - t0:.0f}s")
    files = ", ".join(n for n in ("metrics.jsonl", "loss.png") if (out / n).exists())
    print(f"run directory: {out.resolve()} ({files}, checkpoints/)")
    return {"val_loss": result.final_val_loss, "val_bpb": result.final_val_bpb, "run_dir": str(out)}
