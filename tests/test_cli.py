"""The `lmforge` command: help, config files with overrides, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.cli.common import _optional_sections
from lmforge.errors import LmforgeError
from lmforge.checkpoint import checkpoint_dirs

from .train.helpers import make_shard


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "sample", "tokenizer"):
        assert f"  {cmd}" in out


@pytest.mark.parametrize("cmd", ["train", "demo", "sample"])
def test_every_command_has_useful_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower() and "--" in r.stdout


def test_train_from_toml_with_overrides(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
run_dir = "{tmp_path / 'run'}"
max_steps = 50
eval_every = 10
device = "cpu"
progress = false
plot = false
[model]
vocab_size = 257
d_model = 32
n_layers = 1
n_heads = 2
max_seq_len = 16
[data]
train = ["{shard}"]
seq_len = 16
batch_size = 4
[optim]
lr = 0.003
""")
    r = run("train", "--config", str(toml), "--max-steps", "6", "--ckpt-every", "3")
    assert r.returncode == 0, r.stderr
    assert "done: 6 steps" in r.stdout
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    n = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                max_seq_len=16)).num_params()
    assert r.stdout.startswith(f"model: {n / 1e6:,.2f}M parameters")  # the model size, before training
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_000003", "step_000006"]


def test_bad_config_gives_one_line_error(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[model]\nd_modle = 64\n")
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.d_modle'" in err and "Traceback" not in err
    toml.write_text("[model]\nd_model = 30\nn_heads = 4\n")
    assert main(["train", "--config", str(toml)]) == 2
    assert "model.d_model=30 must be divisible by model.n_heads=4" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert f"config file {tmp_path / 'nope.toml'} not found" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="config file .*nope.toml not found"):  # --debug lets the traceback through
        main(["--debug", "train", "--config", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize("argv, said", [
    (["train", "--max-steps", "0"], "lmforge train: error: max_steps must be > 0, got 0 (lmforge train --help lists "
                                    "the options)"),
    (["train", "--data.batch-size", "0"], "lmforge train: error: data.batch_size must be > 0, got 0 (lmforge train "
                                          "--help lists the options)"),
    (["sft", "--max-steps", "abc"], "lmforge sft: error: --max-steps: invalid literal for int() with base 10: 'abc' "
                                    "(lmforge sft --help lists the options)")])
def test_a_flag_value_the_config_refuses_is_one_line_as_in_a_toml_file(argv, said, capsys):
    """`--max-steps 0` was tyro's seven-line box ('Value error', 'Error parsing TrainConfig: ...') where the same key
    in a TOML file is one line; a value refused by the config's check or its type is now the command's one line."""
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [said, "(run with --debug for a traceback)"]


def test_missing_token_file_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data.train", str(tmp_path / "missing.bin"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "token file not found" in err and "Traceback" not in err


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def _section_labels() -> set[str]:
    """Comments that head a group of config fields (tyro would show them as a field's help)."""
    import inspect
    import re

    from lmforge.model.config import ModelConfig
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import DataConfig, TrainConfig

    src = "".join(inspect.getsource(c) for c in (ModelConfig, OptimConfig, DataConfig, TrainConfig))
    return {m.strip() for m in re.findall(r"^ {4}# ([^\n]+)$", src, flags=re.M)}


@pytest.mark.parametrize("argv", [["train"], ["sample"], ["generate"], ["chat"], ["tokenizer", "encode"],
                                  ["data", "run"]])
def test_no_option_help_is_only_a_section_label(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # one line, boxes and wrapping aside
    labels = _section_labels()
    assert "positions" in labels and "norms" in labels
    assert not [lab for lab in labels if f" {lab} (default:" in text]


def _with_sections_open(cls: type, obj):
    """obj with every nested config section set, the optional ones (None by default, their flags hidden) to
    their defaults, so a parser built from it lists every option a config file could set."""
    import dataclasses
    import typing

    from lmforge.cli.common import _field_type

    opened = {}
    for f in dataclasses.fields(cls):
        tp, _ = _field_type(typing.get_type_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            opened[f.name] = _with_sections_open(tp, getattr(obj, f.name) or tp())
    return dataclasses.replace(obj, **opened)


def _option_parsers(monkeypatch, sections_open: bool = True) -> dict:
    """prog -> the argparse parser of every `lmforge CMD [SUB] --help` that tyro builds (with `sections_open`, every
    optional section opened; without, as `--help` alone builds it)."""
    import importlib
    import warnings

    import tyro
    import tyro.extras

    from lmforge.cli import COMMANDS

    parsers = {}

    def capture(cls, *, args=None, default=None, **kw):
        if sections_open and _optional_sections(cls):
            default = _with_sections_open(cls, default if default is not None else cls())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # get_parser is deprecated; the parser is the same
            parsers[kw["prog"]] = tyro.extras.get_parser(cls, default=default, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(tyro, "cli", capture)
    for name, (module, _) in COMMANDS.items():
        groups = getattr(importlib.import_module(module), "COMMANDS", None)  # lmforge GROUP SUB
        for argv in ([[name, sub] for sub in groups] if groups else [[name]]):
            try:
                main([*argv, "--help"])
            except SystemExit:
                pass
    return parsers


def test_every_option_of_every_command_has_help(monkeypatch, capsys):
    """`lmforge bench optimizers --help` listed --steps, --seed, ... with only their defaults, `data
    train-classifier` its --positive/--negative/--out with only "(required)", `train` its --parallel.pp-schedule
    bare: every option of every command (optional sections opened) says in one line what it sets."""
    import re

    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    assert {"lmforge train", "lmforge bench optimizers", "lmforge data train-classifier", "lmforge scaling sweep",
            "lmforge kto", "lmforge tokenizer stats"} <= set(parsers)
    flags = {prog: {s for a in p._actions for s in a.option_strings} for prog, p in parsers.items()}
    assert {"--parallel.pp-schedule", "--model.moe.n-experts", "--model.rope-scaling.beta-fast"} <= flags[
        "lmforge train"]
    bare = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, p in parsers.items() for a in p._actions
            if not re.sub(r"\((default: .*|required)\)$", "", a.help or "", flags=re.S).strip()]
    assert bare == []


def test_no_option_help_shows_an_empty_default(monkeypatch, capsys):
    """`lmforge train --help` said "--data.val ... (default: )" and `sample` the same of --stop-token-ids and
    --logit-bias: tyro writes an empty list, tuple or dict as nothing. Every option of every command says "none"."""
    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    helps = {f"{prog} {a.option_strings[0]}": a.help for prog, p in parsers.items() for a in p._actions
             if a.option_strings}
    assert [flag for flag, h in helps.items() if "(default: )" in (h or "")] == []
    assert helps["lmforge train --data.val"].endswith("(default: none)")
    assert helps["lmforge sample --stop-token-ids"].endswith("(default: none)")
    assert helps["lmforge sample --logit-bias"].endswith("(default: none)")


def test_help_names_every_flag_of_the_sections_it_hides(monkeypatch, capsys):
    """`lmforge sft --help` lists no --lora.* flag (tyro lists a section that defaults to None only once it is set)
    and said only `--lora.FIELD flags turn the lora section on`: a first-time user saw no field. The description
    names every flag such a section hides, for every command (train's --model.moe.*, --model.rope-scaling.*)."""
    import re

    opened, plain = _option_parsers(monkeypatch), _option_parsers(monkeypatch, sections_open=False)
    capsys.readouterr()

    def flags(parser) -> set[str]:
        return {s for a in parser._actions for s in a.option_strings}

    hidden = {prog: flags(opened[prog]) - flags(p) for prog, p in plain.items()}
    assert {"--lora.r", "--lora.alpha", "--lora.save"} <= hidden["lmforge sft"] and hidden["lmforge orpo"]
    assert {"--model.moe.n-experts", "--model.rope-scaling.beta-fast", "--model.mtp.depth"} <= hidden["lmforge train"]
    unnamed = {prog: sorted(f for f in h if not re.search(re.escape(f) + r"[,.]", plain[prog].description or ""))
               for prog, h in hidden.items()}
    assert {prog: u for prog, u in unnamed.items() if u} == {}


def test_train_help_lists_optimizers_and_schedules(capsys):
    from lmforge.optim import OPTIMIZERS, SCHEDULES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert f"--optim.name: {', '.join(sorted(OPTIMIZERS))}" in out
    assert f"--optim.schedule: {', '.join(sorted(SCHEDULES))}" in out


def test_train_refuses_a_model_section_its_switch_ignores(tmp_path, capsys):
    """--model.moe.* without --model.mlp moe would train a dense model: refused before anything starts."""
    shard = make_shard(tmp_path / "t.bin")
    rc = main(["train", "--data.train", str(shard), "--run-dir", str(tmp_path / "run"), "--max-steps", "1",
               "--model.moe.n-experts", "4"])
    err = capsys.readouterr().err
    assert rc != 0 and "model.moe is set but model.mlp='dense' ignores it: set model.mlp='moe', or remove" in err
    assert not checkpoint_dirs(tmp_path / "run")


def test_a_run_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    """--run-dir naming an existing file (or a path under one) is refused in one line that names it and the fix,
    before anything is built (it was a FileExistsError traceback from the metrics log's mkdir)."""
    shard = make_shard(tmp_path / "t.bin")
    taken = tmp_path / "runs_file"
    taken.write_text("notes\n")
    for run_dir, what in [(taken, "is an existing file"), (taken / "a", f"lies under '{taken}', an existing file")]:
        assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == (f"lmforge train: error: run_dir '{run_dir}' {what}, not a directory; set "
                                       "run_dir (--run-dir) to a new or existing directory, or move the file away")
        assert "Traceback" not in err
    assert taken.read_text() == "notes\n"


@pytest.mark.parametrize("size", ["0", "-3"])
def test_generate_refuses_a_batch_size_below_one_naming_the_flag(tmp_path, size, capsys):
    """--batch-size 0 ran with 64 and -3 was refused naming the engine's max_num_seqs (found 2026-12-05): both
    are refused while the options are read, naming --batch-size."""
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompts", "Hi", "--batch-size", size]) == 2
    text = capsys.readouterr().err
    assert f"--batch-size must be >= 1 (prompts decoded together), got {size}" in text.splitlines()[0]
    assert "max_num_seqs" not in text


def test_generate_warns_when_a_prompt_names_a_file(tmp_path, monkeypatch):
    """`--prompts prompts.txt` generated from the text 'prompts.txt' in silence; it now says to use --prompts-file."""
    from lmforge.cli.generate import GenerateConfig, read_prompts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("Once\nTwice\n")
    with pytest.warns(UserWarning, match=r"--prompts 'prompts.txt' names a file.*pass --prompts-file prompts.txt"):
        assert read_prompts(GenerateConfig(checkpoint="x", prompts=("prompts.txt",))) == ["prompts.txt"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that is no file's name: nothing to say
        assert read_prompts(GenerateConfig(checkpoint="x", prompts=("Once upon",))) == ["Once upon"]


def test_warnings_print_as_one_line_naming_the_command(tmp_path, capsys):
    """A warning during a command was Python's two lines pointing at tyro's file or the console script; now
    `lmforge CMD: warning: MSG`. Python's own showwarning is back once the command ends (library use is unchanged)."""
    import warnings

    before = warnings.showwarning
    shard = make_shard(tmp_path / "t.bin")
    assert main(["train", "--data.train", str(shard), "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
                 "--optim.warmup-steps", "100", "--model.d-model", "32", "--model.n-layers", "1", "--model.n-heads",
                 "2", "--model.vocab-size", "257", "--data.seq-len", "16", "--data.batch-size", "2", "--progress",
                 "false", "--plot", "false", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert ("lmforge train: warning: optim.warmup_steps=100 > max_steps=2: the learning rate never reaches optim.lr"
            in err)
    assert not [line for line in err if "UserWarning" in line or ".py:" in line]
    assert warnings.showwarning is before
    with pytest.warns(UserWarning, match="after the command"):
        warnings.warn("after the command", UserWarning)


def test_a_closed_stdout_pipe_ends_quietly_with_141(tmp_path):
    """`lmforge data stages | head -1` printed a BrokenPipeError traceback: now nothing, and the status a shell
    gives a command SIGPIPE ended."""
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "data", "stages"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == ""


def test_load_llm_builds_its_engine_config_in_llm_also_with_max_model_len(tmp_path):
    """With --max-model-len, load_llm built an EngineConfig of its own beside LLM's: max_batch_size 0 became 64
    there (LLM refuses it), and an option it did not copy (cuda_graphs) was refused as given beside config=. Now
    max_model_len is an LLM option, and every option reaches the one config LLM builds."""
    from types import SimpleNamespace

    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli.common import load_llm
    from lmforge.errors import ConfigError
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.byte import ByteTokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    path = save_checkpoint(tmp_path / "run", 1, model, tokenizer=ByteTokenizer())
    cfg = SimpleNamespace(checkpoint=str(path), base=None, tokenizer=None, device="cpu", kv_policy=None,
                          max_model_len=48)
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        load_llm(cfg, max_batch_size=0)
    llm = load_llm(cfg, max_batch_size=3, cuda_graphs=False)
    assert (llm.config.max_num_seqs, llm.config.cuda_graphs, llm.config.max_model_len) == (3, False, 48)
    assert llm.max_seq_len == 48


# `lmforge CMD --help` (and a typo'd flag, which fails in the same parse) imports only what builds the options:
# the libraries a command runs on are imported where it runs. In one interpreter, the post-training commands last.
_HELP_IMPORTS = r"""
import contextlib, importlib, io, json, sys
from lmforge.cli import COMMANDS, main

POSTTRAIN = ("sft", "dpo", "rm", "distill", "kto", "orpo")


def helps(names):
    for name in names:
        groups = getattr(importlib.import_module(COMMANDS[name][0]), "COMMANDS", None)  # lmforge GROUP SUB
        for argv in ([[name, sub] for sub in groups] if groups else [[name]]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main([*argv, "--help"])
                except SystemExit:
                    pass
            assert "usage" in out.getvalue().lower(), argv
            yield argv


def loaded(prefixes):
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes))


LIBS = ["transformers", "trl", "peft", "datasets", "scipy", "matplotlib", "triton", "sympy"]
plain = list(helps([c for c in COMMANDS if c not in POSTTRAIN]))
first = loaded(["torch", *LIBS])
post = list(helps(POSTTRAIN))
print(json.dumps({"plain": plain, "post": post, "first": first,
                  "then": loaded(["torch", *LIBS, "lmforge.model.transformer", "lmforge.align.sft"])}))
"""


def test_help_imports_no_heavy_library():
    """`lmforge rm --help` took 6 s of CPU: the post-training configs imported the model code, and with it
    torch._dynamo, sympy and triton; `train --help` imported the trainer, `scaling flops` and `bench` torch. Then
    `lmforge sft --help` still took 3.4 s: the objectives' options lived beside the objectives, which import torch
    (lmforge.align.config holds them now)."""
    import json

    r = subprocess.run([sys.executable, "-c", _HELP_IMPORTS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert ["train"] in got["plain"] and ["scaling", "flops"] in got["plain"] and ["data", "stages"] in got["plain"]
    assert len(got["post"]) == 6
    assert got["first"] == []  # no torch at all for every command but the post-training ones
    assert got["then"] == []  # nor for those


def test_data_stages_refuses_arguments(capsys):
    assert main(["data", "stages", "--verbose"]) == 2
    assert "`lmforge data stages` takes no arguments, got '--verbose'" in capsys.readouterr().err
    assert main(["data", "stages", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge data stages") and "extract" not in out


@pytest.mark.parametrize("argv, message", [
    (["train", "run.toml"], "lmforge train: error: a config file is given with --config: lmforge train --config "
                            "run.toml [--section.key value]"),
    (["sft", "sft.json", "--max-steps", "3"], "lmforge sft: error: a config file is given with --config: lmforge "
                                              "sft --config sft.json"),
    (["data", "run", "--config", "p.toml"], "lmforge data: error: this command takes --config's value as a "
                                            "positional argument, without the flag: lmforge data run PIPELINE.toml"),
])
def test_a_config_file_given_the_other_commands_way_is_named_with_the_usage(argv, message, capsys):
    """`lmforge train run.toml` was tyro's 'Unrecognized options: run.toml'; `lmforge data run --config p.toml` its
    "Missing value for argument 'pipeline'": train takes --config FILE, data run its pipeline as a positional."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Unrecognized" not in err and "Missing value" not in err


@pytest.mark.parametrize("argv, message", [
    (["sample", "runs/demo", "--max-tokens", "5"], "lmforge sample: error: the checkpoint is given with "
                                                   "--checkpoint, not as a positional argument: lmforge sample "
                                                   "--checkpoint runs/demo [options]"),
    (["chat", "runs/demo"], "lmforge chat: error: the checkpoint is given with --checkpoint, not as a positional "
                            "argument: lmforge chat --checkpoint runs/demo [options]"),
    (["scaling", "fit", "runs.csv"], "lmforge scaling: error: no positional argument is taken, got 'runs.csv': options "
                                     "are flags (--name value; lmforge scaling fit --help lists them)"),
])
def test_a_positional_argument_to_a_command_of_flags_names_the_flag(argv, message, capsys):
    """`lmforge sample runs/demo` (as `lmforge export runs/demo OUT` is written) was tyro's box calling the path an
    unrecognized option beside a missing --checkpoint: one line naming the flag the value wants."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message + "\n") and "Unrecognized" not in err
    with pytest.raises(SystemExit):  # --help still answers
        main([*argv, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: lmforge {' '.join(argv[:2 if argv[0] == 'scaling' else 1])}")


def test_option_help_reads_as_one_paragraph(monkeypatch, capsys):
    """tyro kept every line break of an indented field docstring (it joins lines only where the next starts with a
    letter, and looks before dedenting), so at 80 columns each option's help also broke at its source lines:
    `lmforge chat --help` showed "else chatml where" / "the" / "tokenizer has ..." on three rows. Every option of
    every command reads as one paragraph (blank lines, "- " items and lines opening with a flag may still break: the
    joining first ran `train`'s description's "--optim.name: ..." / "--nproc N: ..." lines into one)."""
    import re

    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    broken = {f"{prog} {a.option_strings[0]}": a.help for prog, p in parsers.items() for a in p._actions
              if a.option_strings and re.search(r"\S\n(?![ \t]*(?:\n|--\w|[-*] ))", a.help or "")}
    assert broken == {}
    lines = parsers["lmforge train"].description.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("--")][:3] == [
        "--optim.name", "--optim.schedule", "--nproc N"]
    template = next(a.help for a in parsers["lmforge chat"]._actions if "--template" in a.option_strings)
    assert "else chatml where the tokenizer has its markers" in template


def test_train_help_says_what_data_train_and_val_take(capsys):
    """`--data.val`'s help said only "validation shards", though it takes what --data.train does (shard_paths): its
    help and --data.train's name files, directories (their *.bin) and glob patterns."""
    import re

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"[│\s]+", " ", capsys.readouterr().out)
    for flag in ("--data.train", "--data.val"):
        help_ = re.search(re.escape(flag) + r" \[STR \[STR \.\.\.\]\] (.*?) \(default", text).group(1)
        assert all(w in help_ for w in ("token shard files", "directory", "*.bin", "glob pattern")), (flag, help_)


@pytest.mark.parametrize("name, line", [("p.txt", "Once"), ("p.jsonl", '{"prompt": "Once"}')])
def test_generate_prompts_file_drops_a_byte_order_mark(tmp_path, name, line):
    """A Windows editor's byte-order mark opened the first prompt of a text file (the model saw its three bytes) and
    made a .jsonl file's first line 'not valid JSON'."""
    from lmforge.cli.generate import GenerateConfig, read_prompts

    (tmp_path / name).write_text(f"\ufeff{line}\nTwice\n" if name == "p.txt" else f"\ufeff{line}\n", encoding="utf-8")
    assert read_prompts(GenerateConfig(checkpoint="x", prompts_file=str(tmp_path / name)))[0] == "Once"
