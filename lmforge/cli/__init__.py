"""The `lmforge` command. One module per command group; each exposes `main(argv) -> int | None` and
builds its options from config dataclasses with tyro (see `lmforge.cli.common`). Nothing is imported
until a command runs."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import sys

# command -> (module, one-line help). Modules that do not exist yet are hidden.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lmforge.cli.demo", "train a small LM on Python's own sources and sample from it (no downloads)"),
    "train": ("lmforge.cli.train", "pretrain a model from a TOML config (--config FILE --section.key value)"),
    "sft": ("lmforge.cli.sft", "supervised fine-tuning on chat JSONL (--config FILE)"),
    "dpo": ("lmforge.cli.dpo", "preference optimisation: DPO / IPO / SimPO (--config FILE)"),
    "rm": ("lmforge.cli.rm", "train a reward model on preference pairs (--config FILE)"),
    "distill": ("lmforge.cli.distill", "distill a teacher into the model (--config FILE)"),
    "kto": ("lmforge.cli.kto", "KTO on unpaired desirable / undesirable completions (--config FILE)"),
    "orpo": ("lmforge.cli.orpo", "ORPO: SFT plus an odds-ratio preference term, no reference (--config FILE)"),
    "sample": ("lmforge.cli.sample", "sample text from a checkpoint"),
    "generate": ("lmforge.cli.generate", "batch generation from prompts to JSONL"),
    "chat": ("lmforge.cli.chat", "terminal chat with a checkpoint"),
    "export": ("lmforge.cli.export", "a checkpoint as a HF model directory (LoRA merged) or a PEFT adapter"),
    "tokenizer": ("lmforge.cli.tokenizer", "train / encode / inspect BPE tokenizers"),
    "data": ("lmforge.cli.data", "run pretraining data pipelines"),
    "scaling": ("lmforge.cli.scaling", "scaling-law sweeps and fits"),
    "bench": ("lmforge.cli.bench", "benchmarks (optimizers, ...)"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def _usage() -> str:
    lines = ["usage: lmforge [--debug] COMMAND [options]   (lmforge COMMAND --help for its options)", "",
             "commands:"]
    for name, (_, help_) in _available().items():
        lines.append(f"  {name:<10} {help_}")
    return "\n".join(lines)


def _show_warning(cmd: str):
    """warnings.showwarning for a command's run: `lmforge CMD: warning: MSG` on one line. The file and source line
    Python would add point at tyro or the console script (warn_caller names the first frame outside lmforge, which
    for a command is one of those), so they say nothing to someone at a terminal."""
    from lmforge.errors import ConfigWarning
    from lmforge.parallel.reports import report_once  # (N processes of one --nproc launch warn once)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if category in (UserWarning, ConfigWarning) else f" ({category.__name__})"
        text = f"lmforge {cmd}: warning{kind}: {message}"
        try:
            if report_once(text):
                print(text, file=file or sys.stderr)
        except OSError:  # stderr closed: a warning is not worth failing the command for
            pass
    return show


def _quiet_broken_pipe() -> int:
    """After stdout's reader went away (`lmforge data stages | head -1`): point stdout at /dev/null, so Python's
    flush at exit does not raise again, and return 141, the status a shell reports for a process that SIGPIPE ended
    (what `cat FILE | head -1` gives), so `set -o pipefail` scripts see the same as for any other command."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (replaced in-process)
        pass
    return 141


TRAINING = ("train", "sft", "dpo", "rm", "distill", "kto", "orpo")
"""the commands that run the Trainer: run again, they resume from the run_dir's last checkpoint"""

DEBUG_ENV = "LMFORGE_DEBUG"
"""environment variable: 1 is --debug (set while a command runs under --debug: the processes it starts inherit it)"""


def main(argv: list[str] | None = None) -> int:
    """Run `lmforge COMMAND ...`; returns the exit status: 0 done, 2 a user error (printed in one line), 130 Ctrl-C,
    141 when stdout is a pipe whose reader closed early (`| head`). While a command runs, Python warnings print as
    `lmforge COMMAND: warning: MSG` (in Python's own format under --debug). --debug, or LMFORGE_DEBUG=1 in the
    environment: errors raise with their traceback; the processes `--nproc N` starts inherit it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV) == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        import lmforge

        print(f"lmforge {lmforge.__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    table = _available()
    if cmd not in table:
        from lmforge.cli.parse_errors import did_you_mean

        print(f"lmforge: error: unknown command {cmd!r}{did_you_mean(cmd, list(table))}; choose one of: "
              f"{', '.join(table)}", file=sys.stderr)
        return 2
    import warnings

    from lmforge.errors import LmforgeError, write_refused
    from lmforge.parallel.launch import quiet_signals
    from lmforge.parallel.reports import launched_worker, peer_ended, report_once
    from lmforge.utils import environment

    # (restores Python's showwarning, the environment and the signal handlers when the command ends: library use is
    # untouched); a process of an --nproc launch ends at once and quietly on a signal outside the Trainer's fit
    with warnings.catch_warnings(), environment({DEBUG_ENV: "1"} if debug else {}), \
            (quiet_signals() if launched_worker() else contextlib.nullcontext()):
        if not debug:
            warnings.showwarning = _show_warning(cmd)
        try:
            module = importlib.import_module(table[cmd][0])
            status = int(module.main(rest) or 0)
            sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at interpreter exit
            return status
        except BrokenPipeError:
            return _quiet_broken_pipe()
        except LmforgeError as e:
            if debug:
                raise
            if report_once(f"lmforge {cmd}: error: {e}"):  # (N processes that fail alike: one line)
                print(f"lmforge {cmd}: error: {e}", file=sys.stderr)
                print("(run with --debug for a traceback)", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if not launched_worker():  # (the --nproc launcher says it once for all)
                print(f"\nlmforge {cmd}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a full disk or read-only file system under any writer (metrics.jsonl...): one line
            if not debug and launched_worker() and peer_ended(e):  # (the process that ended says why, or the launcher)
                said = (f"lmforge {cmd}: error: a peer process of this run ended while this one waited on it "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); where no other line says why, "
                        "run with --debug")
                if report_once(said):  # (one line, not gloo's traceback; never nothing: a peer may end cleanly)
                    print(said, file=sys.stderr)
                return 128 + signal.SIGTERM  # as torchrun's SIGTERM ends it: the launcher's line comes first
            why = None if debug else write_refused(e)
            if why is None:
                raise
            where = next((x.filename for x in (e, e.__context__, e.__cause__) if getattr(x, "filename", None)), None)
            resumes = " (it resumes from its last checkpoint)" if cmd in TRAINING else ""
            fix = "free space" if why == "disk full" else "make it writable again"
            print(f"lmforge {cmd}: error: {why}{f' writing {where}' if where else ''}; {fix} and run the "
                  f"command again{resumes}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
