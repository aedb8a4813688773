"""tyro's parse errors as the one line `lmforge` prints for a user's mistake: an unknown flag (with the option tyro
would suggest), a flag without its value, a missing required argument (with the usage), a value left over, a choice
not offered, a value the config refuses. tyro drew a box of up to a dozen lines around each; parse_config hooks
this in through tyro's parse-error hook."""

from __future__ import annotations

from contextlib import contextmanager

from lmforge.cli.common import _bool_flags, _options
from lmforge.errors import ConfigError


def near(typed: str, names: list[str]) -> list[str]:
    """The names nearest an unknown `typed`, by tyro's rule for its "Perhaps you meant" (in
    tyro._backends._tyro_help_formatting.unrecognized_args_error): a name ending with the one typed (dashes aside), or
    holding each of its dotted parts, scores 0.9, any name difflib's ratio; those scoring 0.8 or more. Changed here:
    the score is the higher of the two (tyro's 0.9 hid a closer ratio: `--model.moe.n-expert` put `d-expert` before
    `n-experts`), ties going to the closer ratio, and only those within 0.05 of the best are kept (three at most); the
    first rule needs two characters typed (every flag ending in "t" matched `-t`). Flags are compared as `--help`
    spells them (`--max-steps`), commands as they are."""
    import difflib

    bare = typed.lstrip("-")

    def score(name: str) -> tuple[float, float]:  # (the score, then the ratio: `--lr` ends four optim.*lr flags)
        ratio = difflib.SequenceMatcher(a=typed, b=name).ratio()
        rule = len(bare) >= 2 and (name.endswith(bare) or all(p in name for p in bare.split(".")))
        return max(0.9 * rule, ratio), ratio

    scored = sorted(((score(o), o) for o in names), key=lambda x: (-x[0][0], -x[0][1], x[1]))
    best = scored[0][0][0] if scored else 0.0
    return [o for (s, _), o in scored if s >= max(0.8, best - 0.05)][:3]


def did_you_mean(typed: str, commands: list[str]) -> str:
    """' (did you mean 'encode'?)' for a command or subcommand typed wrong; '' where none is near."""
    close = near(typed, commands)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and not arg[1:2].isdigit() and not arg.startswith("-.")


def _spelled(flag: str) -> str:
    """A flag as `--help` spells it (normalize_argv hands tyro `--ignore_eos` for `--ignore-eos`)."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def _leftover(values: list[str], argv: list[str], bools: set[str]) -> str:
    """What is wrong with values tyro found no option for, each read where it stands in argv: after a bool flag (a
    word it does not take), or past the one value a flag takes (most often a value with spaces left unquoted)."""
    def name(arg: str) -> str:  # ('--ignore-eos=x' -> 'ignore_eos', as _bool_flags names it)
        return arg.split("=", 1)[0][2:].replace("-", "_")

    after: dict[int, list[str]] = {}
    for value in values:  # (where no flag's value: after a value, a --flag=value, or a bool flag bare_bools set)
        at = next((i for i, a in enumerate(argv) if a == value and i
                   and (not _is_flag(argv[i - 1]) or "=" in argv[i - 1] or name(argv[i - 1]) in bools)), None)
        flag = None if at is None else next((j for j in range(at - 1, -1, -1) if _is_flag(argv[j])), None)
        after.setdefault(-1 if flag is None else flag, []).append(value)
    said = []
    for j, got in after.items():
        quoted, flag = ", ".join(repr(v) for v in got), _spelled(argv[j].split("=", 1)[0])
        if j < 0:
            said.append(f"unexpected argument{'s' * (len(got) > 1)} {quoted}: options are flags (--name value)")
        elif name(argv[j]) in bools:
            said.append(f"{flag} takes true or false, got {quoted}")
        else:
            given = " ".join([_spelled(argv[j]), *argv[j + 1:argv.index(got[0], j)]])
            said.append(f"unexpected value{'s' * (len(got) > 1)} {quoted} after {given}: {flag} takes one value"
                        + (" (quote a value with spaces)" if len(got) > 1 else ""))
    return "; ".join(said)


def _unrecognized(tokens: list[str], options: list[str], argv: list[str], bools: set[str]) -> str:
    """tyro's 'Unrecognized options' as one clause per unknown flag, with the options it would suggest (a value
    right after an unknown flag is that flag's), and the values left over (_leftover)."""
    said, values = [], []
    for i, token in enumerate(tokens):
        if _is_flag(token):
            flag = token.split("=", 1)[0]
            close = near(_spelled("--" + flag.lstrip("-")), options)
            said.append(f"unknown option {flag}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        elif not (i and _is_flag(tokens[i - 1]) and "=" not in tokens[i - 1]):
            values.append(token)
    return "; ".join(said + ([_leftover(values, argv, bools)] if values else []))


def _positionals(cls: type) -> list[str]:
    """The metavars of a config's positional arguments, in order (`CKPT OUT`: tyro.conf.arg's, else the name)."""
    import dataclasses
    import typing

    import tyro

    hints = typing.get_type_hints(cls, include_extras=True)
    marks = {f.name: getattr(hints[f.name], "__metadata__", ()) for f in dataclasses.fields(cls)}
    return [next((m.metavar for m in marks[name] if getattr(m, "metavar", None)), name.upper())
            for name in marks if tyro.conf.Positional in marks[name]]


def _missing(cls: type, prog: str, args: list) -> str:
    """`missing OUT: PROG CKPT OUT --FLAG METAVAR [options]` for tyro's missing required arguments."""
    names = [a.lowered.metavar if a.is_positional() else a.lowered.name_or_flags[0] for a in args]
    flags = [f"{a.lowered.name_or_flags[0]} {a.lowered.metavar}" for a in args if not a.is_positional()]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return f"missing {listed}: {' '.join([prog, *_positionals(cls), *flags, '[options]'])}"


def _refused_value(message: str) -> str:
    """tyro's message for a value no type of a union takes ('no type matching {None}|INT could be instantiated from
    ['abc']' and a 'Got errors:' list, five lines) as one clause; any other as tyro wrote it."""
    import re

    m = re.match(r"no type matching (\S+) could be instantiated from \[(.*)\]", message)
    return f"expected {m.group(1)}, got {m.group(2)}" if m else " ".join(message.split())


@contextmanager
def parse_errors_in_one_line(cls: type, argv: list[str], prog: str, extra: tuple[str, ...] = ()):
    """Whatever tyro refuses is a ConfigError, which `lmforge` prints as one line naming the flag and the fix; tyro drew
    a box of up to a dozen lines around it (the same key in a TOML file was one line): a value the config refuses
    (max_steps 0: its check, or 'abc' for an int), an unknown flag (with tyro's suggestion), a flag without its value,
    a missing required argument (with the usage), a value left over, a choice not offered, a missing subcommand.
    Through tyro's parse-error hook (tyro._errors.on_parse_error, in the tyro the project requires; without it, its
    boxes as before; an event this does not know keeps its box). `argv`: as the user gave it (before bare_bools);
    `extra`: options taken before tyro sees them (--config)."""
    try:
        from tyro import _errors as events
    except ImportError:
        yield
        return
    options, bools = [*_options(cls), *extra], _bool_flags(cls)

    def one_line(event) -> str | None:
        if isinstance(event, events.InstantiationFailure):
            flags = getattr(getattr(event.argument, "lowered", None), "name_or_flags", None)
            return (f"{'/'.join(flags)}: " if flags else "") + _refused_value(event.message)
        if isinstance(event, events.UnrecognizedArgs):
            return _unrecognized(event.tokens, options, argv, bools)
        if isinstance(event, events.MissingArgs):
            unknown = _unrecognized(event.unrecognized_tokens, options, argv, bools)
            missing = _missing(cls, prog, [a.arg for a in event.missing_arguments])
            return f"{unknown}; and {missing}" if unknown else missing
        if isinstance(event, events.BadValue):
            flag, lowered = event.argument.display_name(), event.argument.lowered
            if event.argument.is_positional():  # (no token left for it: tyro's "Missing value"; it names no flag)
                unknown = _unrecognized([a for a in argv if _is_flag(a) and _spelled(a.split("=", 1)[0]) not in
                                         options], options, argv, bools)
                missing = _missing(cls, prog, [event.argument])
                return f"{unknown}; and {missing}" if unknown else missing
            if event.reason == "too_few_values":
                n = lowered.nargs if isinstance(lowered.nargs, int) else 1
                return f"{flag} needs {'a value' if n == 1 else f'{n} values'}: {flag} {lowered.metavar}"
            return f"{flag} takes no value, got {event.offending_value!r}"
        if isinstance(event, events.InvalidChoice):
            return (f"{event.argument.display_name()}: invalid choice {event.value!r}; choose one of "
                    f"{', '.join(sorted(event.choices))}")  # (sorted as --help lists them: tyro's order varies)
        if isinstance(event, events.MissingSubcommand):
            return f"a subcommand is needed: one of {', '.join(event.subcommand_spec.parser_from_name)}"
        return None

    def refuse(event) -> None:
        try:
            said = one_line(event)
        except (AttributeError, TypeError, ValueError, IndexError):  # (another tyro's events: its box, not a crash)
            said = None
        if said:
            raise ConfigError(f"{said} ({prog} --help lists the options)")

    with events.on_parse_error(refuse):
        yield
