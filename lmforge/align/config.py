"""The post-training configs, importable without torch: each objective's options (SFTConfig, DPOConfig, KTOConfig,
ORPOConfig, RewardConfig, DistillConfig), the data section (PostDataConfig), the run (PostTrainConfig), the
registry of objectives (OBJECTIVES; register_objective adds one from outside lmforge) and of the record kinds they
train on (DATA_KINDS; register_data_kind), with the name tables the
options are checked against. `lmforge sft --help` and a config file's check build from these alone; the
objectives (lmforge.align.sft, dpo, ...) and the run (lmforge.train.posttrain) import them from here, and re-export
them under their old names."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Literal

from lmforge.adapt.config import LoRAConfig
from lmforge.config import SHORT_DTYPES, check, check_finite, claim, coerce_fields
from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.train.config import LoopConfig

PAIR_LOSSES = ("sigmoid", "ipo", "simpo")
"""DPOConfig.loss_type: the pairwise losses of lmforge.align.losses"""
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl")
"""DistillConfig.divergence (lmforge.align.distill)"""
FROZEN_DTYPE_NAMES = SHORT_DTYPES
"""a {role}_dtype option's names -> the torch dtype each holds a frozen model in (lmforge.align.frozen.FROZEN_DTYPES)"""


def check_beta(beta: float, name: str = "beta", meaning: str = "the strength of the KL anchor") -> None:
    if not beta > 0:
        raise ConfigError(f"{name} must be > 0, got {beta}; e.g. 0.1 ({meaning})")


def check_frozen_dtype(value: str | None, name: str) -> None:
    """A `{role}_dtype` option names a FROZEN_DTYPE_NAMES dtype or is None (the dtype the model was saved in)."""
    if value is not None and value not in FROZEN_DTYPE_NAMES:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(FROZEN_DTYPE_NAMES)} (or None: the dtype it was "
                          "saved in); e.g. 'bf16' holds an fp32 model in half the memory")


def check_frozen_options(cfg, role: str) -> None:
    """The options of a frozen model an objective holds (lmforge.align.frozen), named `{role}_dtype` and, where the
    objective caches its outputs, `{role}_cache`: the one check of ReferenceOptions and DistillConfig's teacher."""
    check_frozen_dtype(getattr(cfg, f"{role}_dtype"), f"{role}_dtype")
    cache = getattr(cfg, f"{role}_cache", 0)
    if cache < 0:
        raise ConfigError(f"{role}_cache={cache} must be >= 0 (0 = no cache)")


@dataclass(frozen=True, kw_only=True)
class ReferenceOptions:
    """The frozen reference policy's options, shared by the objectives that hold one (DPOConfig, KTOConfig):
    a field of each, set as [dpo] reference_dtype = 'bf16' or --kto.reference-cache 64. Subclasses call
    `check_frozen_options(self, "reference")` from their own __post_init__, after coerce_fields."""
    reference_device: str | None = None
    """run the reference on this device (default: where it is)"""
    reference_dtype: str | None = None
    """hold the reference in this dtype: 'fp32' | 'bf16' | 'fp16' (None = as saved); 'bf16' holds an fp32 reference
    beside a bf16-trained model in half the memory (its log-probs are still compared in fp32)"""
    reference_cache: int = 0
    """cache the reference log-probs of this many batches (multi-epoch runs see batches again)"""


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    loss: Literal["token_mean", "sequence_mean"] = "token_mean"
    """token_mean: every trained token weighs the same; sequence_mean: every example weighs the same"""
    neftune_alpha: float = 0.0
    """NEFTune noise scale α (5 in the paper; 0 = off)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "sft")  # each field's type, named when wrong
        check_finite(self, "sft")
        check(self.loss in ("token_mean", "sequence_mean"),
              f"sft.loss must be 'token_mean' or 'sequence_mean', got {self.loss!r}")
        check(self.neftune_alpha >= 0, f"sft.neftune_alpha must be >= 0, got {self.neftune_alpha}")


@dataclass(frozen=True, kw_only=True)
class DPOConfig(ReferenceOptions):
    beta: float = 0.1
    """KL-anchor strength (DPO's beta, IPO's tau, SimPO's reward scale)"""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo | simpo"""
    label_smoothing: float = 0.0
    """probability that a label is flipped (conservative DPO); sigmoid and simpo only"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma"""

    def __post_init__(self):
        coerce_fields(self, "dpo")  # each field's type, named when wrong
        check_finite(self, "dpo")
        check_beta(self.beta)
        if self.loss_type not in PAIR_LOSSES:
            raise ConfigError(f"loss_type={self.loss_type!r} is not one of {PAIR_LOSSES}; KTO and ORPO have their "
                              f"own objectives (lmforge.align.kto:KTOObjective, lmforge.align.orpo:ORPOObjective)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5); 0 = plain DPO")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ConfigError("label_smoothing applies to loss_type 'sigmoid' or 'simpo', not 'ipo'; set it to 0")
        check_frozen_options(self, "reference")


@dataclass(frozen=True, kw_only=True)
class KTOConfig(ReferenceOptions):
    beta: float = 0.1
    """scale of the implied reward beta·log(pi/pi_ref) inside the sigmoid (higher: stay closer to the reference)"""
    desirable_weight: float = 1.0
    """lambda_D: raise it when desirable examples are rarer (the paper keeps w_d n_d / (w_u n_u) in [1, 4/3])"""
    undesirable_weight: float = 1.0
    """lambda_U: the loss weight of undesirable examples"""
    kl: bool = True
    """estimate z0 from mismatched pairs (False: z0 = 0, cheaper)"""

    def __post_init__(self):
        coerce_fields(self, "kto")  # each field's type, named when wrong
        check_finite(self, "kto")
        check_beta(self.beta)
        check_frozen_options(self, "reference")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(frozen=True, kw_only=True)
class ORPOConfig:
    beta: float = 0.1
    """lambda, the weight of the odds-ratio term (TRL calls it beta)"""

    def __post_init__(self):
        coerce_fields(self, "orpo")  # each field's type, named when wrong
        check_finite(self, "orpo")
        check_beta(self.beta, meaning="the weight of the odds-ratio term")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    center_rewards_coefficient: float = 0.0
    """weight of mean((r_c + r_r)^2), keeping rewards centred on 0 (0 = off)"""

    def __post_init__(self):
        coerce_fields(self, "rm")  # each field's type, named when wrong
        check_finite(self, "rm")
        if self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient={self.center_rewards_coefficient} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | sampled_reverse_kl (on-policy: batches the student sampled, so not for
    `lmforge distill`'s fixed data)"""
    beta: float = 0.5
    """jsd interpolation (0 < beta < 1)"""
    temperature: float = 1.0
    """softmax temperature applied to both teacher and student logits before the divergence"""
    weight: float = 1.0
    """weight of the divergence term"""
    sft_weight: float = 0.0
    """weight of the cross-entropy on the data's targets (0 = pure distillation)"""
    teacher_device: str | None = None
    """run the teacher on this device (default: where it is)"""
    teacher_dtype: str | None = None
    """hold the teacher in this dtype: 'fp32' | 'bf16' | 'fp16' (None = as saved); 'bf16' holds an fp32 teacher
    beside a bf16-trained model in half the memory (its logits are still compared in fp32)"""
    teacher_support: bool = False
    """compare the student renormalised over the tokens the teacher gives (its finite logits) only: for a
    top-k teacher, whose reverse KL is otherwise infinite"""
    chunk: int = 0
    """positions per chunk of the divergence, each recomputed in the backward pass (0 = the whole batch at
    once): its fp32 (B, T, V) intermediates, several times the logits, held for one chunk only. Measured on
    CPU (2026-12-06, B=1, T=2048, V=32000, bf16 logits, forward + backward): forward KL peak 2005 -> 341 MB,
    JSD 3007 -> 467 MB at chunk = 256 (the cross-entropy: 443 MB), for ~1.6x the divergence's time"""

    def __post_init__(self):
        coerce_fields(self, "distill")  # each field's type, named when wrong
        check_finite(self, "distill")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence={self.divergence!r} is not one of {DIVERGENCES}")
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"beta={self.beta} must be in (0, 1) for jsd; use forward_kl (beta 0) or "
                              f"reverse_kl (beta 1) for the endpoints")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0, e.g. 1.0 or 2.0")
        if self.divergence == "sampled_reverse_kl" and self.temperature != 1.0:
            raise ConfigError(f"temperature={self.temperature}: sampled_reverse_kl compares the log-probs of the "
                              "sampled tokens at temperature 1 (as the engine gives them); set temperature = 1.0")
        check_frozen_options(self, "teacher")
        if self.chunk < 0:
            raise ConfigError(f"chunk={self.chunk} must be >= 0 (0 = no chunking), e.g. 256")
        if self.weight < 0 or self.sft_weight < 0 or self.weight + self.sft_weight == 0:
            raise ConfigError(f"weight={self.weight} and sft_weight={self.sft_weight} must be >= 0, not both 0")


@dataclass(frozen=True, kw_only=True)
class PostDataConfig:
    train: tuple[str, ...] = ()
    """JSONL files of chat / prompt-completion / preference / KTO records"""
    val: tuple[str, ...] = ()
    """validation JSONL files; if empty, `val_fraction` of the training records, evenly spaced over all the
    files (each gives its share), is held out"""
    val_fraction: float = 0.05
    """share of the training records held out for validation when `val` is empty"""
    template: str = ""
    """chat template (chatml | llama3 | plain); its special tokens must be special tokens of the tokenizer. '' = the
    one the init checkpoint recorded (a fine-tuning run's), else chatml where the tokenizer has its markers as special
    tokens, else plain (lmforge.infer.chat_template.choose_template, as `lmforge chat`)"""
    loss_on: Literal["assistant", "all"] = "assistant"
    """'assistant': loss on assistant turns / completions only; 'all': on every token"""
    seq_len: int = 512
    """tokens per row (an example longer than this is truncated, see `truncation`)"""
    batch_size: int = 8
    """rows per micro-batch (a packed row holds several examples)"""
    packing: bool = True
    """pack several examples per row (per-document attention, positions restart); SFT only (a data kind whose
    DataKindSpec.packs)"""
    on_error: Literal["raise", "skip"] = "raise"
    """a malformed record stops the run with its file:line ('raise') or is counted and reported ('skip')"""
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    """an example longer than seq_len + 1 tokens keeps its first ('keep_start') or its last ('keep_end': a long
    prompt loses its oldest tokens, its completion stays whole) seq_len + 1 tokens (TRL's truncation_mode)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "data")  # each field's type, named when wrong
        check_finite(self, "data")
        check(self.seq_len > 1, f"data.seq_len must be > 1, got {self.seq_len}")
        check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        check(0 <= self.val_fraction < 1, f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        check(self.loss_on in ("assistant", "all"), f"data.loss_on must be 'assistant' or 'all', got {self.loss_on!r}")


@dataclass(frozen=True)
class DataKindSpec:
    """A kind of post-training record (ObjectiveSpec.data): how lmforge.align.data checks and encodes one JSONL record
    and batches the encoded items. The functions are 'module:function' paths, imported when a run reads data (so the
    registry stays torch-free, as OBJECTIVES); register_data_kind adds one from outside lmforge."""
    encode: str
    """(enc, rec, where, fit) -> item: one record (a dict; `where` is its file:line) checked and encoded with the
    run's lmforge.align.data.Encoder `enc` (enc.prompt_completion / enc.chat give (ids, mask) examples). Every
    example goes through fit(example), which truncates it to seq_len + 1 tokens (data.truncation) and refuses one
    with nothing left to train; a bad record raises lmforge.align.data.RecordError(reason, f"{where}: ..."), which
    data.on_error='skip' counts under `reason`. An item is built of lists, tuples, tensors, numbers, strings and
    None: a resumed run compares a fingerprint of the items (lmforge.align.data.fingerprint), which reads any other
    object by its repr (an address by default, new in every process: a resume would be refused)"""
    collate: str
    """(items, data, options) -> dict of tensors: a batch of items, for the run's PostDataConfig `data` and the
    objective's options (its [name] section; None outside a run)"""
    keys: tuple[str, ...]
    """the keys every batch holds (what an objective on this kind may read); a batch without one is refused"""
    check: str | None = None
    """(items) -> None: a check over all the items of one file set (data.train, data.val) once read, raising
    lmforge.errors.DataError (None: none)"""
    packs: bool = False
    """its items are single (ids, mask) examples, which data.packing packs several to a row of seq_len tokens
    (lmforge.align.data.packed_batch, not `collate`, then batches the rows)"""


DATA_KINDS: dict[str, DataKindSpec] = {}
"""ObjectiveSpec.data: the record kinds lmforge.align.data reads, by name (register_data_kind adds one)"""


@dataclass(frozen=True)
class ObjectiveSpec:
    path: str
    """'module:Class' of the objective"""
    data: str
    """record kind it trains on: sft | preference | kto, or one given to register_data_kind (DATA_KINDS)"""
    wrap: str | None = None
    """'module:Class' wrapping the loaded model (a reward model's scalar head)"""
    config: type | None = None
    """the objective's options (its class's `Config`), given here so that `lmforge NAME --help` and a config file's
    check do not import the objective (and torch); None: the objective class's `Config`, imported with it"""
    disable_dropout: bool = False
    """the objective's default of PostTrainConfig.disable_dropout: switch every dropout of the policy off, as TRL's
    trainer of the same loss does by default (DPO, KTO, ORPO/CPO, reward, GKD: on; SFT, GRPO, RLOO: off)"""


OBJECTIVES: dict[str, ObjectiveSpec] = {
    # disable_dropout: TRL 1.16's defaults (SFTConfig has none: dropout stays; DPOConfig, RewardConfig, KTOConfig,
    # ORPOConfig and GKDConfig, whose generalised JSD lmforge.align.distill implements: True)
    "sft": ObjectiveSpec("lmforge.align.sft:SFTObjective", "sft", config=SFTConfig),
    "dpo": ObjectiveSpec("lmforge.align.dpo:DPOObjective", "preference", config=DPOConfig, disable_dropout=True),
    "rm": ObjectiveSpec("lmforge.align.reward:RewardObjective", "preference", wrap="lmforge.align.reward:SequenceHead",
                        config=RewardConfig, disable_dropout=True),
    "distill": ObjectiveSpec("lmforge.align.distill:DistillObjective", "sft", config=DistillConfig,
                             disable_dropout=True),
    "kto": ObjectiveSpec("lmforge.align.kto:KTOObjective", "kto", config=KTOConfig, disable_dropout=True),
    "orpo": ObjectiveSpec("lmforge.align.orpo:ORPOObjective", "preference", config=ORPOConfig, disable_dropout=True),
}


def _check_path(owner: str, field_name: str, path: str | None, what: str, optional: bool = False) -> None:
    """A spec's lazily imported 'module:`what`' path (`optional`: None, leaving it out, is fine too)."""
    if optional and path is None:
        return
    module, _, name = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not module or not name:
        raise ConfigError(f"{owner}: {field_name}={path!r} is not 'module:{what}' (the {what.lower()} is imported "
                          "from the module when a run needs it)")


def register_data_kind(name: str, spec: DataKindSpec) -> DataKindSpec:
    """Add a record kind under `name` from outside lmforge (as register_objective adds an objective): then an
    ObjectiveSpec(..., data=name) trains on such records through posttrain, and lmforge.align.data.build_sources
    reads them. The built-in sft, preference and kto are registered this way. A name taken by another spec is
    refused; registering the same spec again does nothing. Returns spec."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a data kind registers under a Python identifier (ObjectiveSpec.data names it), got "
                          f"{name!r}; e.g. 'ranked'")
    if not isinstance(spec, DataKindSpec):
        raise ConfigError(f"register_data_kind({name!r}, ...) takes a DataKindSpec, got {type(spec).__name__}; e.g. "
                          "DataKindSpec('my_module:encode', 'my_module:collate', keys=('input_ids', 'targets'))")
    for what in ("encode", "collate", "check"):
        _check_path(f"data kind {name!r}", f"DataKindSpec.{what}", getattr(spec, what), "Function", what == "check")
    if not (isinstance(spec.keys, tuple) and spec.keys and all(isinstance(k, str) and k for k in spec.keys)):
        raise ConfigError(f"data kind {name!r}: DataKindSpec.keys={spec.keys!r} must be a non-empty tuple of the "
                          "batch keys every batch holds, e.g. ('input_ids', 'targets', 'loss_mask')")
    return claim(DATA_KINDS, name, spec, "data kind")


def data_kind(name: str) -> DataKindSpec:
    """The registered record kind `name`; an unknown name is a config mistake (ConfigError, as objective_spec's)."""
    if name not in DATA_KINDS:
        raise ConfigError(f"unknown data kind {name!r}; choose one of {', '.join(DATA_KINDS)}, or register it with "
                        "lmforge.align.config.register_data_kind")
    return DATA_KINDS[name]


LM_KEYS = ("input_ids", "targets", "loss_mask")
"""the batch keys of lmforge.train.objective (a preference pair's under chosen_ / rejected_)"""
# the built-in kinds, registered as any other (their functions live beside the Encoder, in lmforge.align.data)
register_data_kind("sft", DataKindSpec("lmforge.align.data:encode_sft", "lmforge.align.data:collate_sft",
                                       keys=LM_KEYS, packs=True))
register_data_kind("preference", DataKindSpec("lmforge.align.data:encode_preference",
                                              "lmforge.align.data:collate_preference",
                                              keys=tuple(f"{side}_{k}" for side in ("chosen", "rejected")
                                                         for k in LM_KEYS),
                                              check="lmforge.align.data:pair_margins"))
register_data_kind("kto", DataKindSpec("lmforge.align.data:encode_kto", "lmforge.align.data:collate_kto",
                                       keys=(*LM_KEYS, "label")))


def register_objective(name: str, spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add a post-training objective under `name` from outside lmforge, as register_model adds a model class: then
    PostTrainConfig(objective=name) / config_class(name) (its options as the [name] section), posttrain and
    lmforge.cli.sft.run_objective(name, argv) run it. A name taken by another spec is refused; registering the
    same spec again does nothing. Returns spec."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"an objective registers under a Python identifier (it names the [{name}] section of its "
                          f"options and the config's field), got {name!r}; e.g. 'slic' or 'my_loss'")
    if name in {f.name for f in dataclasses.fields(PostTrainConfig)}:  # (config_class adds a field `name`)
        raise ConfigError(f"an objective cannot register as {name!r}: the run's config has a field of that name "
                          f"(its [{name}] section would be the objective's options); choose another name")
    if not isinstance(spec, ObjectiveSpec):
        raise ConfigError(f"register_objective({name!r}, ...) takes an ObjectiveSpec, got {type(spec).__name__}; "
                          f"e.g. ObjectiveSpec('my_module:MyObjective', 'preference')")
    if spec.data not in DATA_KINDS:
        raise ConfigError(f"objective {name!r} trains on data kind {spec.data!r}, which lmforge.align.data does not "
                          f"read; choose one of {', '.join(DATA_KINDS)}, or register it first with register_data_kind")
    for what in ("path", "wrap"):
        _check_path(f"objective {name!r}", f"ObjectiveSpec.{what}", getattr(spec, what), "Class", what == "wrap")
    return claim(OBJECTIVES, name, spec, "objective")


def resolve(path: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {path} ({e}); is its module importable here (a registered one: where the "
                          "run starts; an lmforge one: is this lmforge version complete)?") from e


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


@dataclass(frozen=True, kw_only=True)
class PostTrainConfig(LoopConfig):
    objective: str = "sft"
    """sft | dpo | rm | distill | kto | orpo (set by the command), or a name given to register_objective"""
    init: str = ""
    """checkpoint, run directory or HF model directory to start from"""
    reference: str = ""
    """frozen reference model for DPO/KTO ('' = the init model; with [lora]: the policy with adapters off); refused
    for an objective that uses none (SFT, ORPO, SimPO, ...)"""
    teacher: str = ""
    """teacher model for distillation; refused for an objective that uses none"""
    tokenizer: str = ""
    """tokenizer spec ('' = the one saved with the init model)"""
    lora: LoRAConfig | None = None
    """[lora] train LoRA adapters on the policy instead of all its weights (None: full fine-tuning); flags
    --lora.r, --lora.alpha, --lora.targets, --lora.dropout, --lora.trainable, --lora.rslora open it"""
    data: PostDataConfig = field(default_factory=PostDataConfig)
    disable_dropout: bool | None = None
    """switch every dropout of the policy off while it trains (nn.Dropout modules, LoRA's included, and attention's
    dropout on its weights); None = the objective's default, as TRL's trainer: on for dpo, kto, orpo, rm and
    distill, off for sft (ObjectiveSpec.disable_dropout). The checkpoints keep the init model's model.dropout"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """[parallel] data-parallel layout over the processes (`--nproc N`): dp_shard (FSDP2) or dp_replicate (DDP)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        objective_spec(self.objective)
        other = {d: getattr(self.parallel, d) for d in ("tp", "pp", "cp") if getattr(self.parallel, d) > 1}
        if other:
            raise ConfigError(f"post-training runs data parallel only, got parallel {other}: use dp_shard / "
                              "dp_replicate and set tp = pp = cp = 1")
        options = getattr(self, self.objective, None)  # (config_class's section; a bare PostTrainConfig has none)
        if isinstance(options, KTOConfig) and options.kl and self.data.batch_size < 2:
            # TRL's KTOTrainer refuses it too: the mismatched pair of a lone row is the row itself
            raise ConfigError(f"data.batch_size={self.data.batch_size}: KTO estimates its reference point z0 from each "
                              "prompt paired with another row's completion, which a batch of one row lacks; set "
                              f"data.batch_size >= 2, or {self.objective}.kl = false (z0 = 0)")
        if getattr(getattr(self, "distill", None), "divergence", None) == "sampled_reverse_kl":
            # its gradient estimates the reverse KL only for tokens the current student sampled; the run's data are
            # fixed completions (someone else's samples), whose estimate is biased and need not even be >= 0
            raise ConfigError("distill.divergence='sampled_reverse_kl' needs on-policy samples from the student, but "
                              "`lmforge distill` trains on the fixed completions of data.train; use reverse_kl (the "
                              "exact reverse KL on these tokens), or call DistillObjective on batches the student "
                              "sampled (lmforge.align.distill)")


def config_class(name: str) -> type[PostTrainConfig]:
    """PostTrainConfig plus a section `name` holding the objective's own Config (defaults applied), so
    TOML files and the generated CLI reach its options as [name] / --name.key."""
    spec = objective_spec(name)
    options = spec.config or getattr(resolve(spec.path), "Config", None)
    extra = [("objective", str, field(default=name))]
    if options is not None:
        extra.append((name, options, field(default_factory=options)))
    return dataclasses.make_dataclass(f"{name.upper()}RunConfig", extra, bases=(PostTrainConfig,), frozen=True,
                                      kw_only=True)
