"""Post-training data: JSONL records -> token examples with loss masks -> batches for the Trainer.

Record formats (one JSON object per line; TRL's field names):
  chat                {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
  prompt/completion   {"prompt": str | messages, "completion": str | messages}
  preference          {"prompt": ..., "chosen": ..., "rejected": ...}              (DPO family, reward models)
                      optional "margin": number, the gap a reward model must leave (every record or none)
  unpaired (KTO)      {"prompt": ..., "completion": ..., "label": true | false}

An example is (ids, mask): mask[i] is true where token i is trained on as a target. Chat goes through the
chat template of lmforge.infer.chat_template: with loss_on="assistant" only the assistant turns' content and
end markers count (TRL's assistant_only_loss), and of a prompt/completion record only the completion's (a
prompt's own assistant turns are context, as in TRL's SFT / DPO / KTO); loss_on="all" trains on every token.
Batches carry the keys of lmforge.train.objective: input_ids, targets (-100 where not trained), loss_mask;
packed rows add doc_ids and positions restarting per document (lmforge.model.meta), so several examples
share a row without attending to each other; preference pairs become chosen_* / rejected_* (+ `margin` (B,)
when the records give one, read by lmforge.align.reward's RewardObjective), KTO adds `label`.

Records made by sampling (lmforge.align.sampled, lmforge.align.cai) also carry the sampled tokens:
"prompt_ids" and "completion_ids" (a pair's "chosen_ids" / "rejected_ids"). Those are trained as they are,
not re-encoded from the text (which may split differently, or not round-trip where a sample holds an
incomplete character): the loss on the completion ids, and nothing appended, since a sample that stopped holds
the token (or the stop string's tokens) that ended it and one cut at max_tokens has no end. The prompt ids must
be this Encoder's encoding of the prompt (the chat template opened for the assistant), else the record was
sampled under another template or tokenizer and is refused; a side without ids (a reference solution) is
encoded from its text.

Each record kind is an entry of lmforge.align.config.DATA_KINDS (a DataKindSpec: how a record is checked and
encoded, how items are batched, the keys every batch holds): the three above are registered there as any other,
with their functions encode_* / collate_* below, and register_data_kind adds one from outside lmforge (a ranked
list for a ranking loss, ...) that build_sources reads on the same path.

Bad records raise a one-line DataError naming file:line and field (on_error="raise"), or with
on_error="skip" are counted per reason in a DataReport that the caller prints and saves: never dropped
silently. Examples longer than seq_len + 1 tokens are truncated, and counted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from array import array
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.align.config import KTOConfig, PostDataConfig, data_kind, resolve
from lmforge.errors import DataError, LmforgeError, warn_caller
from lmforge.infer.chat_template import MARKER, ChatTemplate, choose_template, get_template
from lmforge.model.meta import packed_positions
from lmforge.tokenizer.load import takes_where

Example = tuple[list[int], list[bool]]
IGNORE = -100


@dataclass
class DataReport:
    """Records read, used, truncated, and rejected per reason (with the first place each reason occurred)."""

    records: int = 0
    used: int = 0
    truncated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)
    held_out: int = 0
    """of the used records, how many went to validation (data.val_fraction)"""
    val: "DataReport | None" = None
    """the validation files' own report (data.val)"""

    def reject(self, reason: str, message: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.first.setdefault(reason, message)

    def summary(self) -> str:
        bad = ", ".join(f"{n} {r} (first: {self.first[r]})" for r, n in self.rejected.items()) or "none"
        held = f" ({self.held_out} held out for validation)" if self.held_out else ""
        val = f"; validation files: {self.val.summary()}" if self.val is not None else ""
        return (f"{self.records} records: {self.used} used{held}, {self.truncated} truncated to seq_len, "
                f"rejected: {bad}{val}")

    def to_dict(self) -> dict[str, Any]:
        out = {"records": self.records, "used": self.used, "truncated": self.truncated,
               "rejected": self.rejected, "first": self.first, "held_out": self.held_out}
        if self.val is not None:
            out["val"] = self.val.to_dict()
        return out


# tokenizing records -------------------------------------------------------------------------------
def check_template(tokenizer, template: ChatTemplate, plain: str = "data.template='plain'") -> None:
    """Every <|...|> marker of the template must be one special token of the tokenizer; otherwise the
    model sees it as ordinary text and never learns where turns end. `plain`: how the caller's user
    switches to the plain template."""
    for marker in dict.fromkeys(MARKER.findall(template.bos + template.header + template.end)):
        ids = tokenizer.encode(marker)
        if len(ids) != 1:
            raise DataError(f"chat template {template.name!r} uses {marker} but the tokenizer encodes it as "
                            f"{len(ids)} tokens, not one special token: use a tokenizer that parses it as one "
                            f"(a BPE tokenizer trained with it as a special token) or {plain}")


def encode_inside(tokenizer, text: str) -> list[int]:
    """`text`'s ids where it continues a text encoded before it (a completion after its prompt, a step after the
    one before, an option letter after "("): a SentencePiece-style tokenizer then puts no "▁" before it, as HF's
    encoding of the two as one text; other tokenizers put nothing before any text."""
    return tokenizer.encode(text, where="inside") if takes_where(tokenizer, "encode") else tokenizer.encode(text)


class RecordError(DataError):
    """A bad record: `reason` is the short key a DataReport counts it under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Encoder:
    """Records -> examples, for one tokenizer, template and loss setting."""

    def __init__(self, tokenizer, template: str, loss_on: str = "assistant"):
        self.tok, self.template, self.loss_on = tokenizer, get_template(template), loss_on
        check_template(tokenizer, self.template)
        self.eos = getattr(tokenizer, "eot_id", None)
        self.plain_end = not MARKER.search(self.template.end)
        """whether the template's end marker is plain text ("\\n"), which cannot tell where an answer ends (chat)"""
        if self.eos is None and self.plain_end:
            import warnings

            warnings.warn(f"chat template {self.template.name!r} ends an answer with {self.template.end!r}, which "
                          "cannot tell its end, and the tokenizer has no end-of-text token to close it with: a model "
                          "trained on this data will not stop by itself; use a tokenizer with one (eot_id) or a "
                          "template with end markers", stacklevel=2)

    def chat(self, messages: Any, where: str, field_name: str = "messages", n_prompt: int = 0) -> Example:
        """field_name: the record field the messages came from (a preference pair's are prompt + chosen/rejected).
        The first `n_prompt` messages are a prompt/completion record's prompt: with loss_on='assistant' they are
        never trained, assistant turns included (only the completion is, as TRL's SFT / DPO / KTO)."""
        if not isinstance(messages, list) or not messages:
            raise RecordError("bad_messages",
                              f"{where}: field {field_name!r} must be a non-empty list of {{role, content}} objects")
        if self.loss_on == "assistant" and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                   for m in messages[n_prompt:]):
            after = " after its prompt" if n_prompt else ""
            raise RecordError("no_assistant_turn", f"{where}: field {field_name!r} has no assistant turn{after}, so "
                              "nothing would be trained; add one or set data.loss_on='all'")
        # a template whose end marker is plain text ("\n", plain's) cannot tell where an answer ends: a final answer
        # is closed with the end-of-text token instead (trained; generation stops on it: infer.request.stop_ids), as
        # TRL appends EOS, so an answer may span lines; before, a plain-SFT model never stopped by itself
        closes = (self.eos is not None and self.plain_end
                  and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant")
        try:
            ids, mask = self.template.encode(self.tok, messages, add_generation_prompt=False,
                                             continue_final_message=closes)
        except (LmforgeError, AttributeError) as e:
            raise RecordError("bad_messages", f"{where}: field {field_name!r}: {e}") from e
        if closes:
            ids, mask = ids + [self.eos], mask + [True]
        if self.loss_on == "all":
            return ids, [True] * len(ids)
        if n_prompt:
            # each piece is tokenized on its own (ChatTemplate.encode), so the prompt's tokens open the full encoding
            p_ids, _ = self.template.encode(self.tok, messages[:n_prompt], add_generation_prompt=False)
            if ids[:len(p_ids)] != p_ids:
                raise DataError(f"chat template {self.template.name!r} does not encode a prompt as a prefix of "
                                "prompt + completion, so the prompt's tokens cannot be told apart; use chatml or plain")
            mask = [False] * len(p_ids) + mask[len(p_ids):]
        return ids, mask

    def prompt_completion(self, prompt: Any, completion: Any, where: str, name: str = "completion",
                          ids: tuple[Any, Any] | None = None) -> Example:
        """Loss on the completion only (TRL's completion_only_loss) unless loss_on='all'. Strings are
        concatenated (+ the end-of-text token); message lists go through the chat template; ids (the record's
        prompt_ids and `name`_ids, see the module docstring) are taken as they are."""
        for fname, v in (("prompt", prompt), (name, completion)):
            if not (isinstance(v, str) and v) and not (isinstance(v, list) and v):
                raise RecordError(f"bad_{fname}",
                                  f"{where}: field {fname!r} must be a non-empty string or list of messages")
        if isinstance(prompt, list) != isinstance(completion, list):
            raise RecordError("mixed_formats",
                              f"{where}: fields 'prompt' and {name!r} must both be strings or both message lists")
        if ids is not None:
            return self.sampled(prompt, *ids, where, name)
        if isinstance(prompt, list):  # conversational: the completion's assistant turns are trained, not the prompt's
            return self.chat(prompt + completion, where, f"prompt + {name}", n_prompt=len(prompt))
        # (the completion continues the prompt's text: a SentencePiece tokenizer puts no "▁" before it, as HF's
        # encoding of the two as one text)
        p = self.tok.encode(prompt)
        c_ids = encode_inside(self.tok, completion) + ([self.eos] if self.eos is not None else [])
        return p + c_ids, [self.loss_on == "all"] * len(p) + [True] * len(c_ids)

    def sampled(self, prompt: Any, prompt_ids: Any, completion_ids: Any, where: str, name: str) -> Example:
        """A sampled record's tokens as they are, after checking the prompt ids are this Encoder's prompt."""
        V = self.tok.vocab_size
        for fname, v in (("prompt_ids", prompt_ids), (f"{name}_ids", completion_ids)):
            if not (isinstance(v, list) and v and all(type(t) is int and 0 <= t < V for t in v)):
                raise RecordError("bad_ids", f"{where}: field {fname!r} must be a non-empty list of token ids "
                                             f"below the tokenizer's vocab_size={V}")
        if isinstance(prompt, list):
            try:
                want = self.template.encode(self.tok, prompt, add_generation_prompt=True)[0]
            except (LmforgeError, AttributeError) as e:
                raise RecordError("bad_messages", f"{where}: field 'prompt': {e}") from e
        else:
            want = self.tok.encode(prompt)
        if prompt_ids != want:
            raise RecordError("ids_mismatch", f"{where}: field 'prompt_ids' is not this run's encoding of 'prompt' "
                              f"(chat template {self.template.name!r}): it was sampled under another template or "
                              "tokenizer; set data.template to the one it was sampled with, or remove the *_ids "
                              "fields to train on the re-encoded text")
        return prompt_ids + completion_ids, [self.loss_on == "all"] * len(prompt_ids) + [True] * len(completion_ids)


def sampled_ids(rec: dict, name: str) -> tuple[Any, Any] | None:
    """(prompt_ids, `name`_ids) of a record that carries its sampled tokens, else None (encoded from text)."""
    return (rec.get("prompt_ids"), rec[f"{name}_ids"]) if f"{name}_ids" in rec else None


def check_data_file(path: str | Path) -> Path:
    """`path` as a Path, refused where it is no file (missing, or a directory: the files in it named)."""
    path = Path(path)
    if path.is_dir():
        from lmforge.train.data import directory_error

        raise directory_error(path, "a JSONL data file", "*.jsonl")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _strict_utf8(data: bytes) -> tuple[str, int]:
    return data.decode("utf-8"), 0


def read_jsonl(path: str | Path, report: DataReport, on_error: str):
    """(where, record) for every record of a JSON Lines file, or of a `.json` file holding one JSON array
    (`lmforge.data.readers.json_records`, the data pipeline's reader too); where is file:line or file:element N.
    Undecodable records raise or are counted."""
    from lmforge.data.readers import ARCHIVE_ERRORS, NotCompressed, json_records

    path = check_data_file(path)
    try:
        for rec in json_records(path, _strict_utf8):
            report.records += 1
            where = f"{path.name}:{rec.key}"
            problem = _record_problem(rec)
            if problem is None:
                yield where, rec.value
            elif on_error == "raise":
                raise DataError(f"{where}: the record is {problem}; "
                                + (_json_array_hint() if rec.key == "1" and _opens_array(rec)
                                   else "fix the file" if rec.key == "file" else
                                   "fix the line or set data.on_error='skip'"))
            else:
                report.reject("bad_json", where)
    except NotCompressed as e:
        raise DataError(str(e)) from e
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: the compressed file is cut or damaged ({type(e).__name__}: {e}); "
                        "decompress it again or give an intact copy") from e


def _record_problem(rec) -> str | None:
    if isinstance(rec.error, UnicodeDecodeError):
        return f"not UTF-8: {rec.error.reason} at byte {rec.error.start}"
    if rec.error is not None:
        return f"not JSON: {rec.error}"
    return None if isinstance(rec.value, dict) else f"a {type(rec.value).__name__}, not an object"


def _opens_array(rec) -> bool:
    """Whether a record opens a JSON array: one on one line, or the '[' of a pretty-printed one."""
    if isinstance(rec.error, json.JSONDecodeError):
        return rec.error.doc.lstrip().startswith("[")
    return isinstance(rec.value, list)


def _json_array_hint() -> str:
    """A file not named .json that holds one JSON array (found 2026-12-07: Alpaca's alpaca_data.json renamed
    .jsonl). Only a .json file is read as one array: a JSON Lines file whose first line is cut after a '[' would
    otherwise be one bad array, all its good lines lost."""
    return ("the file looks like one JSON array, which is read as one only from a file whose name ends in .json "
            "(before any .gz/.zst): rename it, or write one record per line")


def _truncate(ex: Example, max_tokens: int, cut: list[bool], where: str, keep_end: bool = False) -> Example:
    ids, mask = ex
    if len(ids) > max_tokens:
        cut.append(True)
        ids, mask = (ids[-max_tokens:], mask[-max_tokens:]) if keep_end else (ids[:max_tokens], mask[:max_tokens])
    if not any(mask[1:]):
        which = "last" if keep_end else "first"
        raise RecordError("no_trainable_tokens", f"{where}: no trainable tokens within its {which} {max_tokens} "
                          "tokens (seq_len + 1); raise data.seq_len, shorten the prompt"
                          + ("" if keep_end else " or set data.truncation='keep_end' (keep the completion)"))
    return ids, mask


def encode_record(enc: Encoder, rec: dict, kind: str, where: str, max_tokens: int, report: DataReport,
                  truncation: str = "keep_start", encode=None):
    """One record -> the item of its data kind (DATA_KINDS[kind].encode, or `encode`, that function resolved once by
    a caller reading many): an SFT example, a (chosen, rejected) pair ((chosen, rejected, margin) when the record has
    a 'margin'), (example, label) for KTO; a record truncated (any example of it) counts once in report.truncated."""
    cut: list[bool] = []
    keep_end = truncation == "keep_end"
    encode = encode or resolve(data_kind(kind).encode)
    item = encode(enc, rec, where, lambda ex: _truncate(ex, max_tokens, cut, where, keep_end))
    report.truncated += bool(cut)
    return item


def encode_sft(enc: Encoder, rec: dict, where: str, fit) -> Example:
    """Data kind 'sft': a chat record or a prompt/completion record -> one example."""
    if "messages" in rec:
        return fit(enc.chat(rec["messages"], where))
    if "prompt" in rec and "completion" in rec:
        return fit(enc.prompt_completion(rec["prompt"], rec["completion"], where, ids=sampled_ids(rec, "completion")))
    raise RecordError("unknown_format", f"{where}: expected field 'messages' (chat) or 'prompt' + "
                                        f"'completion'; got {sorted(rec)}")


def encode_preference(enc: Encoder, rec: dict, where: str, fit) -> tuple:
    """Data kind 'preference': prompt + chosen + rejected [+ margin] -> (chosen, rejected[, margin])."""
    for f in ("prompt", "chosen", "rejected"):
        if f not in rec:
            implicit = f == "prompt" and "chosen" in rec and "rejected" in rec  # TRL's implicit prompt (HH-RLHF)
            raise RecordError(f"missing_{f}", f"{where}: preference record lacks field {f!r} (needs prompt, chosen, "
                              "rejected)" + ("; where chosen and rejected each hold the whole conversation (an "
                                             "implicit prompt), move the turns they share into 'prompt'"
                                             if implicit else ""))
    if rec["chosen"] == rec["rejected"]:
        raise RecordError("chosen_equals_rejected", f"{where}: fields 'chosen' and 'rejected' are identical, so "
                          "the pair teaches nothing; remove the record")
    margin = rec.get("margin")
    if "margin" in rec and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                            or not math.isfinite(margin)):
        raise RecordError("bad_margin", f"{where}: field 'margin' must be a finite number, got {margin!r}")
    pair = tuple(fit(enc.prompt_completion(rec["prompt"], rec[side], where, side, sampled_ids(rec, side)))
                 for side in ("chosen", "rejected"))
    return pair + (float(margin),) if "margin" in rec else pair


def encode_kto(enc: Encoder, rec: dict, where: str, fit) -> tuple[Example, bool]:
    """Data kind 'kto': prompt + completion + label -> (example, label)."""
    if not isinstance(rec.get("label"), bool):
        raise RecordError("bad_label", f"{where}: field 'label' must be true (desirable) or false (undesirable), "
                        f"got {rec.get('label')!r}")
    return fit(enc.prompt_completion(rec.get("prompt"), rec.get("completion"), where,
                                     ids=sampled_ids(rec, "completion"))), rec["label"]


def load_records(files: tuple[str, ...], enc: Encoder, kind: str, seq_len: int, on_error: str,
                 truncation: str = "keep_start") -> tuple[list, DataReport]:
    """All usable items of `files` (see encode_record), checked together (DataKindSpec.check), and the report of
    what was read."""
    spec = data_kind(kind)  # (an unknown kind: before any file is read)
    encode = resolve(spec.encode)  # (once, not per record)
    report = DataReport()
    items = []
    for path in files:
        for where, rec in read_jsonl(path, report, on_error):
            try:
                items.append(encode_record(enc, rec, kind, where, seq_len + 1, report, truncation, encode))
                report.used += 1
                continue
            except RecordError as e:
                bad, cause = e, None
            except LmforgeError:
                raise
            except Exception as e:  # a registered encode trusting its record (rec["score"]): told as a bad record
                bad, cause = RecordError("encode_error", f"{where}: data kind {kind!r} ({spec.encode}) raised "
                                                         f"{type(e).__name__}: {' '.join(str(e).splitlines())}"), e
            if on_error == "raise":  # the record's own message, and the way to go on without it
                raise RecordError(bad.reason, f"{bad}; fix the record or set data.on_error='skip' to count and "
                                              "skip such records") from cause
            report.reject(bad.reason, where)
    if not items:
        raise DataError(f"no usable {kind} records in {list(files)}: {report.summary()}")
    if spec.check is not None:  # e.g. a file set mixing pairs with and without a margin fails here, not mid-run
        resolve(spec.check)(items)
    return items, report


# batches -----------------------------------------------------------------------------------------
def _triplet(ex: Example) -> tuple[list[int], list[int], list[bool]]:
    """(ids, mask) -> model inputs, next-token targets, and which targets count."""
    ids, mask = ex
    return ids[:-1], ids[1:], mask[1:]


def pad_batch(examples: list[Example], length: int | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest (or `length`); padding is masked out."""
    trips = [_triplet(e) for e in examples]
    T = length or max(len(x) for x, _, _ in trips)
    ids = torch.zeros(len(trips), T, dtype=torch.long)
    tgt = torch.full((len(trips), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(trips), T, dtype=torch.bool)
    for r, (x, y, m) in enumerate(trips):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(m)] = torch.tensor(m, dtype=torch.bool)
        tgt[r, :len(y)] = torch.where(mask[r, :len(y)], torch.tensor(y), IGNORE)
    return {f"{prefix}input_ids": ids, f"{prefix}targets": tgt, f"{prefix}loss_mask": mask}


def pack_rows(examples: list[Example], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples in each row of `seq_len` input tokens (each example
    takes len(ids) - 1 positions). Longest first, each into the fullest row that still has room."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) - 1))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        need = len(examples[i][0]) - 1
        if need > seq_len:
            raise DataError(f"an example of {need + 1} tokens does not fit a row of seq_len={seq_len}; "
                            "truncate examples to seq_len + 1 tokens (load_records does)")
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, r))
    return rows


def packed_batch(rows: list[list[Example]], seq_len: int) -> dict[str, torch.Tensor]:
    """Rows of several examples: doc_ids number the examples of a row (padding gets its own id),
    positions restart at 0 per example, targets never cross an example boundary."""
    B = len(rows)
    ids = torch.zeros(B, seq_len, dtype=torch.long)
    tgt = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, seq_len, dtype=torch.bool)
    doc = torch.zeros(B, seq_len, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            x, y, m = _triplet(ex)
            n = len(x)
            ids[r, at:at + n] = torch.tensor(x)
            mask[r, at:at + n] = torch.tensor(m, dtype=torch.bool)
            tgt[r, at:at + n] = torch.where(mask[r, at:at + n], torch.tensor(y), IGNORE)
            doc[r, at:at + n] = d
            at += n
        doc[r, at:] = len(row)
    return {"input_ids": ids, "targets": tgt, "loss_mask": mask, "doc_ids": doc, "positions": packed_positions(doc)}


def pair_margins(pairs: list[tuple]) -> torch.Tensor | None:
    """(B,) float margins of (chosen, rejected, margin) pairs, None when no pair has one; pairs mixing both are
    refused (a missing margin is not silently 0)."""
    n = sum(len(p) == 3 for p in pairs)
    if 0 < n < len(pairs):
        raise DataError(f"{n} of {len(pairs)} preference pairs have a 'margin' field and the rest none; give every "
                        "record a margin (0 for a plain Bradley-Terry pair) or none")
    return torch.tensor([p[2] for p in pairs], dtype=torch.float32) if n else None


def pair_batch(pairs: list[tuple]) -> dict[str, torch.Tensor]:
    """Preference pairs (chosen, rejected[, margin]) -> chosen_* and rejected_* (each side padded to its own
    longest row), and `margin` (B,) when the pairs carry one (TRL's reward collator passes it on likewise)."""
    batch = {**pad_batch([p[0] for p in pairs], prefix="chosen_"),
             **pad_batch([p[1] for p in pairs], prefix="rejected_")}
    margin = pair_margins(pairs)
    return batch if margin is None else {**batch, "margin": margin}


def kto_batch(items: list[tuple[Example, bool]], kl: bool = True, max_tokens: int | None = None,
              keep_end: bool = False) -> dict[str, torch.Tensor]:
    """Unpaired examples -> input_ids / targets / loss_mask, label, and (kl) KTO's mismatched rows kl_*
    (row i's prompt + row i-1's completion, as TRL) paired over the whole batch here, before data-parallel ranks
    split its rows: N ranks then estimate KTO's reference point from the pairs one process would use. A
    mismatched row longer than `max_tokens` (seq_len + 1) is truncated as the examples are (`keep_end`)."""
    from lmforge.align.kto import mismatched_rows

    batch = pad_batch([e for e, _ in items])
    kl_rows = mismatched_rows(batch, max_tokens, keep_end) if kl else {}
    return {**batch, **kl_rows, "label": torch.tensor([lab for _, lab in items])}


def collate_sft(examples: list[Example], data: PostDataConfig, options: Any = None) -> dict[str, torch.Tensor]:
    """Data kind 'sft' unpacked (data.packing = false): one example per row (pad_batch)."""
    return pad_batch(examples)


def collate_preference(pairs: list[tuple], data: PostDataConfig, options: Any = None) -> dict[str, torch.Tensor]:
    """Data kind 'preference': pair_batch."""
    return pair_batch(pairs)


def collate_kto(items: list[tuple[Example, bool]], data: PostDataConfig, options: Any = None
                ) -> dict[str, torch.Tensor]:
    """Data kind 'kto': kto_batch, with the mismatched rows unless KTO's options say kl = False (KTOConfig(kl=False)
    does not read them; another objective's options on this kind, whose `kl` may be a coefficient, are not read),
    truncated as the examples are."""
    return kto_batch(items, kl=options.kl if isinstance(options, KTOConfig) else True, max_tokens=data.seq_len + 1,
                     keep_end=data.truncation == "keep_end")


def _feed(h, x) -> None:
    if isinstance(x, (list, tuple)):
        try:
            flat = array("q", x).tobytes()  # token ids, a loss mask
        except (TypeError, OverflowError):  # an example (ids, mask), a pair, (example, label)...
            h.update(b"(%d:" % len(x))
            for y in x:
                _feed(h, y)
            return
        h.update(b"[%d:" % len(x) + flat)
    elif isinstance(x, torch.Tensor):  # its repr elides the middle of a long tensor
        h.update(f"t{x.dtype}{tuple(x.shape)}:".encode() + x.detach().cpu().contiguous().view(-1).view(torch.uint8)
                 .numpy().tobytes())
    else:  # a margin, a label
        h.update(b"v" + repr(x).encode() + b";")


def fingerprint(items: list) -> str:
    """A short hash of encoded items in order (their token ids, masks, margins, labels): two item lists of the
    same length and packing that differ in any token hash apart, so a resume can tell its data changed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"%d;" % len(items))
    for item in items:
        _feed(h, item)
    return h.hexdigest()


class ExampleSource:
    """A DataSource over encoded items: each epoch a seeded permutation, cut into batches (SFT with
    packing: the permuted examples are packed into rows first, then the rows are shuffled). The state is
    (epoch, position) and what the epoch's order is a function of (its seed, the items, the packing), so
    resume is exact. A run resumed with a new seed finishes the epoch in its saved order and shuffles the next
    ones with the new seed (a new order mid-epoch would repeat some items and skip others); one resumed with
    other items or packing mid-epoch is refused."""

    def __init__(self, items: list, batch_size: int, collate: Callable[[list], dict[str, torch.Tensor]], *,
                 seed: int = 0, pack_len: int | None = None):
        self.items, self.batch_size, self.collate, self.seed, self.pack_len = items, batch_size, collate, seed, pack_len
        self.epoch, self.pos = 0, 0
        self._order: list | None = None
        self._order_key: tuple[int, int] | None = None  # the (epoch, seed) that _order is the order of
        self._order_seed = seed  # the current epoch's: a resumed run keeps the checkpoint's until the epoch ends
        self.fingerprint = fingerprint(items)  # once: a resume checks that the examples are the checkpoint's

    def _epoch_units(self) -> list:
        """The epoch's batch units: items, or (with packing) rows of items; computed once per (epoch, seed)."""
        key = (self.epoch, self._order_seed)
        if self._order is None or self._order_key != key:
            g = torch.Generator().manual_seed(self._order_seed * 1_000_003 + self.epoch)
            perm = [self.items[i] for i in torch.randperm(len(self.items), generator=g).tolist()]
            if self.pack_len is not None:
                rows = [[perm[i] for i in row] for row in pack_rows(perm, self.pack_len)]
                perm = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
            self._order, self._order_key = perm, key
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        units = self._epoch_units()
        if self.pos >= len(units):
            self.epoch, self.pos, self._order, self._order_seed = self.epoch + 1, 0, None, self.seed
            units = self._epoch_units()
        chunk = units[self.pos:self.pos + self.batch_size]
        self.pos += len(chunk)
        return self.collate(chunk)

    def log_stats(self) -> dict[str, float]:
        """Epochs completed so far, fractional (for metrics.jsonl)."""
        return {"epoch": self.epoch + self.pos / max(1, len(self._epoch_units()))}

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The first epoch's batches in order (for a fixed validation set)."""
        units = self._epoch_units()
        return [self.collate(units[i:i + self.batch_size]) for i in range(0, len(units), self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self._order_seed, "n_items": len(self.items),
                "pack_len": self.pack_len, "units": len(self._epoch_units()), "fingerprint": self.fingerprint,
                "held_out": "spaced"}  # (hold_out's rule: a state without it was saved under the tail rule)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state saved before the order's inputs were (seed, n_items, pack_len, units, fingerprint): taken as
        this source's."""
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order_seed = state.get("seed", self.seed)
        was = (state.get("n_items", len(self.items)), state.get("pack_len", self.pack_len))
        same = state.get("fingerprint", self.fingerprint) == self.fingerprint
        if (was == (len(self.items), self.pack_len) and same) or self.pos == 0:
            return
        if self.pos < state["units"]:
            def data(n: int, pack: int | None) -> str:
                return f"{n} training examples" + (f" packed to {pack} tokens" if pack else " (no packing)")

            unit = "rows" if was[1] else "examples"
            where = f"the checkpoint is {self.pos} of {state['units']} {unit} into epoch {self.epoch} of {data(*was)}"
            if was != (len(self.items), self.pack_len):
                raise DataError(f"{where}, but the data is now {data(len(self.items), self.pack_len)}, so the rest "
                                "of that epoch is unknown; resume with the run's data.train, data.seq_len and "
                                "data.packing, or start a new run with init = that checkpoint")
            older = ("" if "held_out" in state else " (a checkpoint saved before data.val_fraction held out examples "
                     "spread over every file, not the last file's tail, meets this with the same files too)")
            raise DataError(f"{where}, but the examples' contents have changed (fingerprint {state['fingerprint']} "
                            f"-> {self.fingerprint}), so the rest of that epoch is unknown; resume with the run's "
                            "data.train files, tokenizer and data settings (template, loss_on, truncation), or start "
                            f"a new run with init = that checkpoint{older}")
        self.epoch, self.pos, self._order_seed = self.epoch + 1, 0, self.seed  # that epoch had ended


def hold_out(items: list, fraction: float) -> tuple[list, list]:
    """(train, val): int(len(items) * fraction) items, evenly spaced over the whole list, held out for validation.
    Spaced rather than the list's tail, so every training file (read in turn) gives its share and a file sorted
    by length or topic gives its whole range; a function of the items alone (not the seed), so a run resumed
    with a new seed validates on the same items and trains on the same others. Every item is in exactly one."""
    n, n_val = len(items), int(len(items) * fraction)
    if not n_val:
        return items, []
    # the middle of each of n_val equal stretches: increasing by n / n_val >= 1, so all distinct
    picked = {(2 * j + 1) * n // (2 * n_val) for j in range(n_val)}
    return [x for i, x in enumerate(items) if i not in picked], [items[i] for i in sorted(picked)]


def kind_collate(kind: str, data: PostDataConfig, options: Any = None) -> Callable[[list], dict[str, torch.Tensor]]:
    """The batches of data kind `kind`: its DataKindSpec.collate (packed_batch over rows when it packs and
    data.packing is on), each batch checked to hold the spec's keys."""
    spec = data_kind(kind)
    if spec.packs and data.packing:
        collate, maker = partial(packed_batch, seq_len=data.seq_len), "packed_batch (data.packing)"
    else:
        collate, maker = partial(resolve(spec.collate), data=data, options=options), spec.collate

    def checked(units: list) -> dict[str, torch.Tensor]:
        batch = collate(units)
        missing = [k for k in spec.keys if k not in batch]
        if missing:
            raise DataError(f"data kind {kind!r}: {maker} gave a batch without {missing}, which its "
                            f"DataKindSpec.keys promise; return them from the collate or drop them from keys")
        return batch

    return checked


def build_sources(cfg: PostDataConfig, tokenizer, kind: str, seed: int, options: Any = None
                  ) -> tuple[ExampleSource, ExampleSource | None, DataReport]:
    """Training and validation sources for data kind `kind` (DATA_KINDS: 'sft', 'preference', 'kto' or a registered
    one) from cfg's files; options: the objective's own (its [name] section), given to the kind's collate (KTO
    batches carry their mismatched rows unless KTOConfig(kl=False), which does not read them)."""
    if not cfg.train:
        raise DataError("no training data: set data.train to one or more JSONL files")
    spec = data_kind(kind)
    # data.template, else chatml or plain as the tokenizer allows (posttrain passes the one it resolved)
    template, notice = choose_template(tokenizer, cfg.template or None, plain="data.template='plain'")
    if notice:  # (a library caller's fallback to plain is said, as LLM.chat says it)
        warn_caller(notice)
    enc = Encoder(tokenizer, template.name, cfg.loss_on)
    items, report = load_records(cfg.train, enc, kind, cfg.seq_len, cfg.on_error, cfg.truncation)
    if cfg.val:
        val, report.val = load_records(cfg.val, enc, kind, cfg.seq_len, cfg.on_error, cfg.truncation)
    else:
        items, val = hold_out(items, cfg.val_fraction)
        report.held_out = len(val)
    pack = cfg.seq_len if spec.packs and cfg.packing else None
    collate = kind_collate(kind, cfg, options)
    train = ExampleSource(items, cfg.batch_size, collate, seed=seed, pack_len=pack)
    valid = ExampleSource(val, cfg.batch_size, collate, seed=seed + 1, pack_len=pack) if val else None
    return train, valid, report
