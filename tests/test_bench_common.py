"""bench/common.py and the checks the bench scripts gate their timings on: the weight bytes of the batch-1 decode
roofline (one embedding row, not the table), --sections refused when unknown, and bench/train_kernels.py marking a
kernel whose output or gradients disagree with the reference FAIL instead of timing it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from bench import common
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=512,
                pos_emb="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)  # bench/decode.py's


def test_decode_weight_bytes_counts_one_embedding_row():
    """The 1.1B Llama shape in bf16: 2,069,028,864 bytes read per token (the whole-table count was 2,200,096,768);
    a head tied to the embedding reads the whole table, once."""
    cfg = ModelConfig(**LLAMA_1B)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    table = cfg.vocab_size * cfg.d_model * 2
    assert sum(p.numel() * 2 for p in model.parameters()) == 2_200_096_768
    assert common.decode_weight_bytes(model) == 2_200_096_768 - table + cfg.d_model * 2 == 2_069_028_864
    with torch.device("meta"):
        tied = Transformer(dataclasses.replace(cfg, tie_embeddings=True)).to(torch.bfloat16)
    assert common.decode_weight_bytes(tied) == sum(p.numel() * 2 for p in tied.parameters())  # the table once
    with torch.device("meta"):
        learned = Transformer(dataclasses.replace(cfg, pos_emb="learned")).to(torch.bfloat16)
    assert common.decode_weight_bytes(learned) == 2_069_028_864 + cfg.d_model * 2  # one position row too


def test_decode_parts_kinds_add_up_to_the_roofline_bytes():
    from bench.decode_parts import weight_bytes

    with torch.device("meta"):
        model = Transformer(ModelConfig(**LLAMA_1B)).to(torch.bfloat16)
    kinds = weight_bytes(model)
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    assert kinds["embed"] == 2048 * 2 and sum(kinds.values()) + norms == common.decode_weight_bytes(model)


def test_unknown_sections_are_refused_before_anything_runs(capsys):
    ap = argparse.ArgumentParser(prog="bench/x.py")
    assert common.parse_sections(ap, "b,a", ("a", "b", "c")) == ["b", "a"]
    with pytest.raises(SystemExit) as e:
        common.parse_sections(ap, "a,generate,compile", ("a", "b"))
    assert e.value.code == 2
    assert "--sections: unknown 'generate', 'compile'; known: a, b" in capsys.readouterr().err


def test_verdict_names_what_failed_and_nan_fails():
    assert common.verdict({"forward": 1e-6, "gradient": 2e-5}, 1e-4) == "ok"
    assert common.verdict({"forward": 1e-6, "gradient": 0.5}, 1e-4) == "FAIL (gradient 0.5 > 0.0001)"
    assert common.verdict({"forward": float("nan")}, 1e-4).startswith("FAIL (forward nan")


def test_train_kernels_times_only_kernels_that_agree(monkeypatch):
    """A fast path with a wrong forward (rope + 1) or a right forward but wrong gradient (swiglu) is marked FAIL and
    not timed; a correct one (rmsnorm = its reference) is timed with check 'ok'."""
    from bench import train_kernels as tk
    from lmforge.kernels import rmsnorm, rope, swiglu

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # Inductor's CPU compile is not what is tested
    monkeypatch.setattr(rmsnorm, "rms_norm", rmsnorm.rms_norm_ref)
    monkeypatch.setattr(rope, "rope", lambda x, c, s, layout: rope.rope_ref(x, c, s, layout) + 1.0)
    monkeypatch.setattr(swiglu, "swiglu", lambda g, u: swiglu.swiglu_ref(g, u) + (g - g.detach()))
    rows = tk.bench_kernels(tk.SIZES["smoke"], "cpu", torch.float32, argparse.Namespace(budget=1e9))
    triton = {r["kernel"]: r for r in rows if r["variant"] == "triton"}
    assert triton["rmsnorm"]["check"] == "ok" and "fwd_bwd_ms" in triton["rmsnorm"]
    for name in ("rope (half)", "rope (interleaved)"):
        assert triton[name]["check"].startswith("FAIL (forward") and "fwd_ms" not in triton[name]
    assert triton["swiglu"]["check"].startswith("FAIL (gradient") and "fwd_ms" not in triton["swiglu"]
    assert triton["swiglu"]["max_rel_err"] == 0.0
    assert all(r["check"] == "ok" and "fwd_bwd_ms" in r for r in rows if r["variant"] != "triton")


def _rows(path) -> list[dict]:
    import json

    return json.loads(path.read_text())["rows"]


def test_decode_quick_reaches_every_section(tmp_path, monkeypatch):
    """bench/decode.py --quick (its CPU check) through the plain, kernel-step and speculative rows: the kernel-step
    rows died with a TypeError on the GPU (kernel_step_available() had come to take the engine's device) and no
    test ran the script. TRITON_INTERPRET=0: the kernel step is asked whether it runs and says why not, in seconds."""
    from bench import decode

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    decode.main(["--quick", "--batches", "1", "--prompt-len", "8", "--new-tokens", "4",
                 "--sections", "plain,kernels,spec"])
    rows = {r["variant"]: r for r in _rows(tmp_path / "decode_quick.json")}
    assert rows["engine, plain eager paged steps"]["agree"] == 1.0
    assert rows["Triton kernel step"]["note"].startswith("skipped: ")
    spec = [r for name, r in rows.items() if name.startswith("speculative")]
    assert spec and all(r["agree"] == 1.0 for r in spec)  # greedy drafts never change the output


BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script, out, n_rows", [("prefill_attention", "prefill_attention_smoke.json", 4),
                                                 ("paged_attention", "paged_attention.json", 4),
                                                 ("paged_latent", "paged_latent.json", 15)])
def test_attention_benches_smoke(script, out, n_rows, tmp_path, monkeypatch):
    """The decode- and prefill-attention benches' --smoke (their CPU check, kernels in Triton's interpreter): every
    row runs and every kernel row matches its reference. The scripts catch a failing row and go on (a note, or
    the row left out), so a stale call shows in the rows, not in an exit status."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))  # prefill_attention imports bench/attention.py as its sibling
    monkeypatch.setenv("OUT", str(tmp_path))
    importlib.import_module(f"bench.{script}").main(["--smoke"])
    rows = _rows(tmp_path / out)
    failed = [r for r in rows if "FAILED" in r.get("note", "") or "Error" in r.get("note", "")]
    assert len(rows) == n_rows and not failed
    errs = [r[k] for r in rows for k in ("err", "max_err", "default_err") if k in r]
    assert errs and max(errs) < 1e-5  # fp32


def _imported(node, module: str | None) -> dict:
    """The names one import statement binds: lmforge's and bench's objects; other modules' names as None."""
    import importlib

    if module is not None and (BENCH / f"{module}.py").exists():  # a sibling script: `from attention import ...`
        module = f"bench.{module}"
    if module is None or module.split(".")[0] not in ("lmforge", "bench"):
        return {(a.asname or a.name).split(".")[0]: None for a in node.names}
    mod = importlib.import_module(module)
    out = {}
    for a in node.names:
        try:  # a name, or a submodule (`from lmforge.kernels import decode_layer`)
            out[a.asname or a.name] = (getattr(mod, a.name) if hasattr(mod, a.name)
                                       else importlib.import_module(f"{module}.{a.name}"))
        except ImportError:
            raise AssertionError(f"line {node.lineno}: {module} has no {a.name}") from None
    return out


def _stale_calls(tree) -> list[str]:
    """Calls in a bench script of lmforge's (and bench's) functions and classes whose arguments no longer bind to
    the callee's signature, or whose attribute is gone. Names are resolved per function scope: a name assigned or
    imported from elsewhere in a function shadows the module's."""
    import ast
    import inspect

    problems = []

    def scope_names(body_nodes) -> dict:
        names, stack = {}, list(body_nodes)
        while stack:
            n = stack.pop()
            if isinstance(n, ast.ImportFrom):
                names.update(_imported(n, n.module if not n.level else None))
            elif isinstance(n, ast.Import):
                names.update({(a.asname or a.name).split(".")[0]: None for a in n.names})
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) or isinstance(n, ast.arg):
                names.setdefault(getattr(n, "id", None) or n.arg, None)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.setdefault(n.name, None)  # its body is a scope of its own
            elif not isinstance(n, ast.Lambda):
                stack.extend(ast.iter_child_nodes(n))
        return names

    def resolve(expr, scopes):
        if isinstance(expr, ast.Name):
            return next((s[expr.id] for s in reversed(scopes) if expr.id in s), None)
        if isinstance(expr, ast.Attribute) and (base := resolve(expr.value, scopes)) is not None:
            if inspect.ismodule(base) or inspect.isclass(base) and not dataclasses.is_dataclass(base):
                if not hasattr(base, expr.attr):
                    problems.append(f"line {expr.lineno}: {ast.unparse(expr)}: {base.__name__} has no {expr.attr}")
                    return None
            return getattr(base, expr.attr, None)
        return None

    def visit(node, scopes):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = [*child.args.args, *child.args.kwonlyargs, child.args.vararg, child.args.kwarg]
                body = child.body if isinstance(child.body, list) else [child.body]
                visit(child, [*scopes, scope_names([a for a in inner if a] + body)])
                continue
            if isinstance(child, ast.Call) and callable(f := resolve(child.func, scopes)):
                try:
                    sig = inspect.signature(f)
                except (TypeError, ValueError):  # a builtin without one
                    sig = None
                starred = any(isinstance(a, ast.Starred) for a in child.args) or None in [k.arg for k in child.keywords]
                if sig is not None and not starred:  # (*args / **kwargs: not checked)
                    try:
                        sig.bind(*child.args, **{k.arg: k.value for k in child.keywords})
                    except TypeError as e:
                        problems.append(f"line {child.lineno}: {ast.unparse(child)[:100]}: {e}")
            visit(child, scopes)

    visit(tree, [scope_names(tree.body)])
    return problems


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_calls_bind_to_lmforge_signatures(script, monkeypatch):
    """Most bench rows run only on a GPU, lent for minutes: a call left behind by an API change (decode.py's
    kernel_step_available() after it came to take a device) cost a whole GPU call. Every call of an lmforge function
    or class in every script, GPU-only paths included, must bind to its current signature."""
    import ast

    monkeypatch.syspath_prepend(str(BENCH))
    assert _stale_calls(ast.parse((BENCH / script).read_text())) == []
