"""`lmforge data ...`: run pipelines, list stages, train the quality classifier."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import tyro

from lmforge.cli.common import parse_config, refuse_flag_for_positional, run_group


@dataclass(frozen=True, kw_only=True)
class RunArgs:
    """Run (or resume) a data pipeline described by a TOML file."""

    pipeline: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PIPELINE.toml")]
    """the pipeline's TOML file: [input], [[stages]] (`lmforge data stages` lists them), [output]"""
    workers: Optional[int] = None
    """overrides the file's `workers`"""
    executor: Optional[Literal["local", "ray"]] = None
    """overrides the file's `executor`"""
    output: Optional[str] = None
    """overrides [output] dir"""
    restart: bool = False
    """discard an earlier run in the output directory and start over (needed when the inputs changed); only the
    files a run writes there are removed, and a token directory outside it is left as it is"""
    progress: Optional[bool] = None
    """show progress bars (overrides the file's `progress`; unset: the file's value holds)"""


def run(argv: list[str]) -> int:
    from lmforge.data.pipeline import load_pipeline
    from lmforge.data.report import report_markdown

    refuse_flag_for_positional(argv, ("--config", "--pipeline"), "lmforge data run PIPELINE.toml [options]")
    args = parse_config(RunArgs, argv, prog="lmforge data run", description=RunArgs.__doc__ or "",
                        config_file=False)
    cfg = load_pipeline(args.pipeline)
    changes: dict = {}
    if args.progress is not None:
        changes["progress"] = args.progress
    if args.workers is not None:
        changes["workers"] = args.workers
    if args.executor is not None:
        changes["executor"] = args.executor
    if args.output is not None:
        changes["output"] = dataclasses.replace(cfg.output, dir=args.output)
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.executor == "ray":
        from lmforge.data.ray_executor import run_ray

        report = run_ray(cfg, restart=args.restart)
    else:
        from lmforge.data.executor import run_local

        report = run_local(cfg, restart=args.restart)
    print(report_markdown(report))
    hint = read_hint(report, cfg.input.text_key, cfg.output.dir)
    if hint:
        print(hint)
    print(reuse_line(report, cfg.output.dir))
    print(f"kept documents: {report['output']}; report: {cfg.output.dir}/report.md")
    if line := token_line(cfg.output.dir):
        print(line)
    return 0 if report["balance"]["balanced"] else 1


def read_hint(report: dict, text_key: str, out_dir: str) -> str:
    """A line for a run that read nothing usable: every record empty, without the text field, or unreadable."""
    read = next((st for st in report["stages"] if st["name"] == "read"), None)
    if not read or not read["docs_in"] or read["docs_out"]:
        return ""
    rejected = read["rejected"]
    if rejected.get("empty", 0) + rejected.get("read_error:missing_text", 0) == read["docs_in"]:
        return (f"every document read was empty or lacked its text field: is input.text_key right? (the field "
                f"holding the text; now {text_key!r})")
    if sum(n for r, n in rejected.items() if r.startswith("read_error:")) == read["docs_in"]:
        top = max(rejected, key=rejected.get)
        return (f"every record read was a read error (most: {top}, {rejected[top]}): check the input's format "
                f"(input.format; a .json file must hold JSON Lines or one JSON array); each error is in "
                f"{out_dir}/rejected/")
    return ""


def token_line(out_dir: str) -> str:
    """Where the run's token shards are and how to train on them (the tokenize stage's out_dir, which the run
    claims for itself), or "" for a run that wrote none; the run named only its kept documents and report. The
    command sizes the model's vocabulary to the shards' tokenizer: the default model's 32,000 rows would train
    and sample ids a byte tokenizer (257) does not have."""
    from lmforge.data.shards import TokenFile
    from lmforge.data.tokenize import recorded_token_files

    shards = [p for p in recorded_token_files(out_dir) if p.is_file()]
    if not shards:
        return ""
    folder, vocab = shards[0].parent, max(TokenFile(p).vocab_size for p in shards)
    return (f"token shards: {len(shards)} in {folder}; train on them: lmforge train --data.train {folder}/*.bin "
            f"--model.vocab-size {vocab}")


def reuse_line(report: dict, out_dir: str) -> str:
    """What an earlier run contributed to this one. The Ray executor's report counts no shards (it cannot resume: each
    run processes every document); the line said "fresh run: ? shard-phase(s) processed" there."""
    if "shards" not in report:
        return (f"fresh run ({report.get('executor', 'ray')} executor, which does not resume): every one of the "
                f"{report['balance']['input_docs']:,} input documents processed")
    sh = report["shards"]
    if not sh.get("skipped"):
        return f"fresh run: {sh['processed']} shard-phase(s) processed"
    return (f"reused {sh['skipped']} finished shard-phase(s) of the earlier run in {out_dir} (same pipeline, "
            f"inputs unchanged: same file names, sizes and modification times); processed {sh['processed']} now")


def stages(argv: list[str]) -> int:
    from lmforge.data.stages import STAGES
    from lmforge.errors import ConfigError

    if argv in (["-h"], ["--help"]):
        print("usage: lmforge data stages\n\nLists the stages a pipeline can use: each one's name, kind (map: one "
              "document at a time; global: the whole corpus), what it does and its options.")
        return 0
    if argv:  # a typo'd flag was ignored, and the list printed as if it had been understood
        raise ConfigError(f"`lmforge data stages` takes no arguments, got {' '.join(argv)!r}")
    for name, spec in STAGES.items():
        fields = ", ".join(f.name for f in dataclasses.fields(spec.config))
        print(f"{name:<14} {spec.kind:<6} {spec.help}\n{'':<22}options: {fields}")
    return 0


@dataclass(frozen=True, kw_only=True)
class TrainClassifierArgs:
    """Train the hashed n-gram (fastText-style) quality classifier from positive and negative files
    (JSONL with a text field, Parquet, or plain text with one example per line)."""

    positive: tuple[str, ...]
    """files of examples of the quality to keep (label 1)"""
    negative: tuple[str, ...]
    """files of examples to filter out (label 0)"""
    out: str
    """file the trained classifier is saved to"""
    text_key: str = "text"
    """the text field of JSONL and Parquet inputs"""
    holdout: float = 0.1
    """share of examples kept aside to report accuracy"""
    buckets: int = 1 << 18
    """rows of the hashed n-gram embedding table"""
    dim: int = 16
    """embedding size"""
    ngrams: int = 2
    """longest word n-gram used as a feature"""
    epochs: int = 5
    """passes over the training examples"""
    lr: float = 0.5
    """AdaGrad learning rate"""
    seed: int = 0
    """seed of the holdout split and of training"""


def train_classifier_cmd(argv: list[str]) -> int:
    from lmforge.data.classifier import ClassifierConfig
    from lmforge.data.classifier_train import train_from_files

    a = parse_config(TrainClassifierArgs, argv, prog="lmforge data train-classifier",
                     description=TrainClassifierArgs.__doc__ or "")
    cfg = ClassifierConfig(buckets=a.buckets, dim=a.dim, ngrams=a.ngrams, epochs=a.epochs, lr=a.lr, seed=a.seed)
    result = train_from_files(a.positive, a.negative, a.out, cfg=cfg, text_key=a.text_key, holdout=a.holdout)
    print(f"trained on {result['train']} examples; held-out accuracy {result['holdout_accuracy']:.3f} "
          f"on {result['holdout']}; saved to {a.out}")
    return 0


COMMANDS = {
    "run": (run, "run or resume a pipeline: lmforge data run pipeline.toml [--workers N]"),
    "stages": (stages, "list the stages a pipeline can use, with their options"),
    "train-classifier": (train_classifier_cmd, "train the fastText-style quality classifier"),
}


def main(argv: list[str]) -> int:
    return run_group("data", argv, COMMANDS)
