"""Chat templates: a conversation (list of {"role", "content"} messages) -> the prompt text a chat model
was trained on. Used by `lmforge chat`, SFT (loss on assistant turns), the server and `lmforge export`
(`ChatTemplate.jinja()`: the same rendering as HF tokenizer_config.json Jinja).

Each template is a small frozen dataclass of strings, so new formats are data, not code:
  chatml   <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n      (OpenAI ChatML, Qwen)
  llama3   <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...  (Llama 3)
  plain    "User: ...\\nAssistant: ..." for base models and byte-level toy models
A HF checkpoint's own Jinja template (JinjaTemplate) is rendered with jinja2, for generation. OpenAI's "developer"
role is kept for a template that names it (gpt-oss's) and written as "system" by any other (DEVELOPER).

Generation front ends (LLM.chat, a server on an Engine) build each conversation's request with chat_request
(the template's stops added, the seed derived for a batch index), the template from choose_template and
checkpoint_chat_template; normalize_messages takes OpenAI-style messages (content parts, tool calls).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.detok import exact_bytes
from lmforge.tokenizer.load import takes_where

ROLES = ("system", "user", "assistant", "tool")
DEVELOPER = "developer"
"""OpenAI's role for the instructions a system message used to give: a template that writes it as its own role
(gpt-oss's Harmony format: `knows_developer`) gets it as it is; any other template gets it as a "system" message,
as OpenAI's API itself treats a developer message for models that predate the role"""
MARKER = re.compile(r"<\|[^|]*\|>")
"""a template's special-token markers (<|im_start|>, <|eot_id|>, ...): each must be one token of the tokenizer"""


class Piece(NamedTuple):
    """One piece of a rendered conversation: a message's `content` is the user's text, never template syntax."""
    text: str
    train: bool
    """an assistant's content or its end marker: what SFT trains on"""
    content: bool


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    name: str
    bos: str = ""
    """text before the first message"""
    header: str = "{role}\n"
    """opens a message; {role} is replaced by the role name (or role_names[role])"""
    end: str = "\n"
    """closes a message; also the stop string that ends an assistant answer"""
    role_names: tuple[tuple[str, str], ...] = ()

    def role(self, role: str) -> str:
        return dict(self.role_names).get(role, role)

    @property
    def knows_developer(self) -> bool:
        """Whether this template writes a "developer" message as its own role (DEVELOPER); the built-in ones do not:
        they write it as a "system" message."""
        return False

    def _as_known_roles(self, messages: list[dict]) -> list[dict]:
        """`messages` with a developer message as a system one where this template does not know the role (DEVELOPER);
        the caller's dicts are not changed."""
        if self.knows_developer or not any(isinstance(m, dict) and m.get("role") == DEVELOPER for m in messages):
            return messages
        return [dict(m, role="system") if isinstance(m, dict) and m.get("role") == DEVELOPER else m for m in messages]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt for `messages`; with add_generation_prompt (default: unless continue_final_message),
        opened for the assistant's next turn; with continue_final_message, ending right after the last
        (assistant) message's content, for the model to continue it (segments). tools, documents and other
        template variables are a checkpoint's own Jinja template's (JinjaTemplate): a built-in one refuses them."""
        self._no_variables(tools, documents, template_kwargs)
        return "".join(p.text for p in self.segments(messages, _opens(add_generation_prompt, continue_final_message),
                                                     continue_final_message))

    def encode(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, mask: bool = True,
               **template_kwargs) -> tuple[list[int], list[bool] | None]:
        """Token ids of `render(messages)` and, per token, whether SFT trains on it (mask=False: None, and the
        same ids without the mask's cost, ~10x less host time: generation's path). The template's markers that
        are single tokens of this tokenizer are encoded as special tokens, the plain text of each message between
        them (header, content, end string) in one piece, so the ids are those of HF's apply_chat_template on
        jinja() (which tokenizes the rendered text whole; only whitespace ending a message may split otherwise;
        a SentencePiece tokenizer is told where each piece sits, to put "▁" before it only where HF does)
        while the tokens of the first messages are those of those messages alone (SFT's prompt-completion
        records take the prompt's ids as a prefix: lmforge.align.data), and a message that contains
        "<|im_end|><|im_start|>system" stays text: it cannot close its turn or open another (prompt injection
        through user text). A token is trained when it overlaps a trained piece (an assistant's content or end
        marker: HF's assistant-token mask does the same), so " Hi" after a plain "Assistant:" header is trained.
        No BOS is added beyond the template's own (HF: add_special_tokens=False). Chat generation and SFT both
        tokenize conversations here."""
        self._no_variables(tools, documents, template_kwargs)
        pieces = self.segments(messages, _opens(add_generation_prompt, continue_final_message), continue_final_message)
        return self._encode_pieces(tokenizer, pieces, mask)

    def _encode_pieces(self, tokenizer, pieces: list[Piece], mask: bool) -> tuple[list[int], list[bool] | None]:
        plain = _plain(tokenizer)
        ids: list[int] = []
        train: list[bool] = []
        run: list[tuple[str, bool]] = []  # the plain text since the last special marker: (text, train) pieces
        specials: dict[str, list[int]] = {}  # each marker's ids, tokenized once per call
        # where the next run sits in the rendered text HF tokenizes whole (a SentencePiece tokenizer's "▁"
        # before it depends on it: SentencePieceBPE.encode_ordinary): opening it, after a marker, or inside
        # the text of the run before (a header without a marker)
        where = "input"

        def flush() -> None:
            nonlocal where
            text = "".join(t for t, _ in run)
            if mask:
                t, m = _encode_run(tokenizer, plain, run, where)
                train.extend(m)
            else:  # (the same text in the same runs: the same ids)
                t = plain(text, where) if text else []
            ids.extend(t)
            run.clear()
            if text:
                where = "inside"

        for k, p in enumerate(pieces):
            if k and not p.content and not pieces[k - 1].content:  # a header: each message is a run of its own
                flush()
            parts = [p.text] if p.content else MARKER.split(p.text)
            markers = [] if p.content else MARKER.findall(p.text)
            for j, part in enumerate(parts):
                run.append((part, p.train))
                if j < len(markers):
                    one = specials.get(markers[j])
                    if one is None:
                        one = specials[markers[j]] = tokenizer.encode(markers[j])
                    if len(one) == 1:  # a special token of this tokenizer (else plain text, in the run)
                        flush()
                        ids.append(one[0])
                        train.append(p.train)
                        where = "split"
                    else:
                        run.append((markers[j], p.train))
        flush()
        return ids, (train if mask else None)

    def prompt(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> tuple[str, list[int]]:
        """What generation needs: the rendered text (render's) and its ids (encode's, without the training mask),
        from one rendering."""
        self._no_variables(tools, documents, template_kwargs)
        pieces = self.segments(messages, _opens(add_generation_prompt, continue_final_message), continue_final_message)
        return "".join(p.text for p in pieces), self._encode_pieces(tokenizer, pieces, False)[0]

    def _no_variables(self, tools, documents, template_kwargs: dict) -> None:
        """A built-in template has no variables: tool schemas or documents it cannot write would be lost."""
        given = [k for k, v in (("tools", tools), ("documents", documents)) if v] + list(template_kwargs)
        if given:
            raise ConfigError(f"the built-in chat template {self.name!r} cannot render {', '.join(given)}: use a "
                              "checkpoint's own Jinja template (JinjaTemplate; LLM.load reads a HF checkpoint's), or "
                              "describe the tools in a message")

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                 continue_final_message: bool = False) -> list[Piece]:
        """The rendered conversation in pieces: markers, and each message's content apart from them. SFT
        masks the loss to the pieces marked `train` (an assistant's content and its end marker).
        continue_final_message (HF's apply_chat_template and vLLM's name): the last message is a partial
        assistant answer ('{"answer": "') that generation continues, so it is left open: no end marker after
        it, and no new turn (refused with add_generation_prompt, and unless the last message is the
        assistant's). HF's apply_chat_template(continue_final_message=True) on jinja() renders the same."""
        if continue_final_message:
            if add_generation_prompt:
                raise ConfigError("continue_final_message continues the last assistant message and "
                                  "add_generation_prompt opens a new turn: pass add_generation_prompt=False")
            last = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
            if last != "assistant":
                raise ConfigError("continue_final_message needs the conversation to end with the assistant's "
                                  f"partial message to continue; its last message is {last!r}")
        out = [Piece(self.bos, False, False)] if self.bos else []
        for i, m in enumerate(self._as_known_roles(messages)):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ConfigError(f"message {i} has role {role!r}; choose one of {ROLES} (or {DEVELOPER!r}, written "
                                  "as 'system')")
            if m.get("tool_calls"):  # (OpenAI's assistant tool calls: only a model's own Jinja knows its syntax)
                raise ConfigError(f"message {i} has tool_calls, which the built-in chat template {self.name!r} cannot "
                                  "write: use a checkpoint's own Jinja template (JinjaTemplate), or put the call in "
                                  "the message's content as the model writes it")
            if content is None:
                raise ConfigError(f"message {i} has no 'content' (give each message a role and a content string)")
            if not isinstance(content, str):
                raise ConfigError(f"message {i} content must be a string, got {type(content).__name__}")
            out.append(Piece(self.header.format(role=self.role(role)), False, False))
            out.append(Piece(content, role == "assistant", True))
            if not (continue_final_message and i == len(messages) - 1):
                out.append(Piece(self.end, role == "assistant", False))
        if add_generation_prompt:
            out.append(Piece(self.header.format(role=self.role("assistant")), False, False))
        return out

    def jinja(self) -> str:
        """This template as the Jinja of a HF tokenizer_config.json "chat_template" (what `lmforge export`
        writes): it renders what render(messages, add_generation_prompt) does. Every piece of text is a quoted
        literal (a JSON string is a Jinja string with the same escapes), so HF's trim_blocks / lstrip_blocks
        cannot change it; an unknown role raises with the words of segments(). transformers' own
        continue_final_message (cutting the rendering after the last message's content) then gives what
        render(messages, continue_final_message=True) does (tests/infer/test_chat_continue.py)."""
        q = json.dumps
        headers = ", ".join(f"{q(r)}: {q(self.header.format(role=self.role(r)))}" for r in ROLES)
        headers += f", {q(DEVELOPER)}: {q(self.header.format(role=self.role('system')))}"  # (DEVELOPER)
        unknown = " ~ ".join([q("message "), "loop.index0", q(" has role '"), "message['role']",
                              q(f"'; choose one of {', '.join(ROLES)}")])
        return "".join([
            "{%- set headers = {" + headers + "} -%}",
            "{{- " + q(self.bos) + " -}}" if self.bos else "",
            "{%- for message in messages -%}",
            "{%- if message['role'] not in headers -%}{{- raise_exception(" + unknown + ") -}}{%- endif -%}",
            "{{- headers[message['role']] ~ message['content'] ~ " + q(self.end) + " -}}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- headers['assistant'] -}}{%- endif -%}",
        ])

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn during generation: the end marker, and what opens any next
        turn: the header's marker before {role} (<|im_start|>), else (a plain header, "User: ") the end and
        every role's header ("\\nUser:", "\\nTool:", ...): the answer of a model writing the next turn itself
        (a tool's result, the user's reply) ends where that turn would begin."""
        stops = [self.end.strip()] if self.end.strip() else []  # (a blank end alone would stop at every line)
        opens = self.header.split("{role}")[0].strip()
        if opens:
            stops.append(opens)
        else:
            stops += [self.end + self.header.format(role=self.role(r)).rstrip() for r in ROLES]
        return tuple(dict.fromkeys(stops))

    def stop_token_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids of the `stop` markers this tokenizer has as single special tokens: generation given them
        as SamplingParams.stop_token_ids ends on the token itself. Stop strings alone fail where a tokenizer
        does not decode special tokens to text (a HF tokenizer skipping them: the turn never ends), and hold
        back every answer's text that ends in "<" or "<|" until the next token. Markers that are plain text
        for this tokenizer (the byte tokenizer, the plain template's "\\nUser:") stay stop strings only."""
        ids = []
        for marker in self.stop:
            if MARKER.fullmatch(marker):
                t = tokenizer.encode(marker)
                if len(t) == 1:
                    ids.append(int(t[0]))
        return tuple(ids)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
"""end-of-turn markers of common HF chat templates: one that a template's Jinja writes ends an answer"""


@dataclass(frozen=True, kw_only=True)
class JinjaTemplate(ChatTemplate):
    """A HF checkpoint's own chat template (tokenizer_config.json "chat_template" or chat_template.jinja:
    lmforge.checkpoint.hf_chat_template), rendered by jinja2 as transformers' apply_chat_template renders it:
    sandboxed, trim_blocks and lstrip_blocks, loop controls, raise_exception, tojson and strftime_now, the
    tokenizer config's special tokens (bos_token, eos_token, ...) as variables. A default system prompt or other
    logic in the Jinja is kept, which the built-in templates cannot express. encode tokenizes the rendered text
    whole with special tokens parsed and no BOS added (HF: add_special_tokens=False; markers a message's content
    holds are parsed too, as in HF). Generation only: its segments (SFT's trained pieces) cannot be told.
    Messages are passed whole (an assistant's tool_calls, a tool message's name reach the Jinja); render and
    encode take apply_chat_template's tools (JSON schemas, as dicts), documents and other variables
    (enable_thinking=False) for the Jinja. The compiled Jinja is cached by source (_compiled)."""
    source: str
    tokens: tuple[tuple[str, str], ...] = ()
    """the template's variables naming special tokens: (("bos_token", "<|begin_of_text|>"), ...)"""
    header: str = ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> str:
        opens = _opens(add_generation_prompt, continue_final_message)
        if continue_final_message and opens:
            raise ConfigError("continue_final_message continues the last assistant message and "
                              "add_generation_prompt opens a new turn: pass add_generation_prompt=False")
        messages = [dict(m) for m in self._as_known_roles(messages)]
        tag = "\x00lmforge-continue\x00"  # cut after the last content: what transformers does with its own tag
        if continue_final_message:
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ConfigError("continue_final_message needs the conversation to end with a message whose "
                                  "content is a string")
            messages[-1]["content"] += tag
        compiled = _compiled(self.source)
        try:  # (transformers: the special tokens, then the caller's variables over them)
            text = compiled.render(messages=messages, add_generation_prompt=opens, tools=tools,
                                   documents=documents, **{**dict(self.tokens), **template_kwargs})
        except LmforgeError:  # raise_exception(): the template's own words
            raise
        except Exception as e:  # jinja2's UndefinedError, a TypeError adding None or a list to a string, ...
            import jinja2

            if not isinstance(e, (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)):
                raise
            detail = str(e).splitlines()[0] if str(e) else "no message"
            raise ConfigError(f"chat template {self.name!r} failed on these messages ({type(e).__name__}: {detail}); "
                              "give each message a role and a string content (normalize_messages turns OpenAI-style "
                              "messages into that shape)") from e
        if continue_final_message:
            if tag not in text:
                raise ConfigError(f"chat template {self.name!r} does not write the last message's content, so it "
                                  "cannot be continued")
            text = text[:text.rindex(tag)]
        return text

    def encode(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, mask: bool = True,
               **template_kwargs) -> tuple[list[int], list[bool] | None]:
        ids = self.prompt(tokenizer, messages, add_generation_prompt, continue_final_message, tools=tools,
                          documents=documents, **template_kwargs)[1]
        return ids, ([False] * len(ids) if mask else None)

    def prompt(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> tuple[str, list[int]]:
        text = self.render(messages, add_generation_prompt, continue_final_message, tools=tools,
                           documents=documents, **template_kwargs)
        return text, tokenizer.encode(text)

    @property
    def knows_developer(self) -> bool:
        """Whether the Jinja names the "developer" role as a quoted string (gpt-oss's compares message.role with it):
        then it gets developer messages as they are, else as system messages (DEVELOPER). The bare word in a comment
        or a default system prompt ("You are a developer assistant") does not count."""
        return f"'{DEVELOPER}'" in self.source or f'"{DEVELOPER}"' in self.source

    def segments(self, messages, add_generation_prompt: bool = False, continue_final_message: bool = False):
        raise ConfigError(f"chat template {self.name!r} is the checkpoint's own Jinja: it renders prompts for "
                          "generation, but cannot mark an assistant's tokens for training; train with a built-in "
                          f"template ({', '.join(TEMPLATES)})")

    def jinja(self) -> str:
        return self.source

    @property
    def stop(self) -> tuple[str, ...]:
        """The end marker (the tokenizer config's eos_token) and the end-of-turn markers the Jinja writes."""
        stops = [self.end] if self.end else []
        return tuple(dict.fromkeys(stops + [m for m in END_OF_TURN if m in self.source]))

    def stop_token_ids(self, tokenizer) -> tuple[int, ...]:
        return tuple(int(t[0]) for t in map(tokenizer.encode, self.stop) if len(t) == 1)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The Jinja compiled once per source: compiling a chat template costs ~25 ms, rendering it ~0.25 ms
    (a Qwen2.5 template on 2 CPU cores, 2026-12-06), and LLM.chat renders one per conversation."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ConfigError("a HF checkpoint's own chat template is rendered with jinja2, which is not installed: "
                          "pip install jinja2 (it comes with lmforge[hf]'s transformers), or pass template= a "
                          f"built-in one ({', '.join(TEMPLATES)})") from e

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the checkpoint's chat template is not valid Jinja: {e}") from e


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(name="chatml", header="<|im_start|>{role}\n", end="<|im_end|>\n"),
    "llama3": ChatTemplate(name="llama3", bos="<|begin_of_text|>",
                           header="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>"),
    "plain": ChatTemplate(name="plain", header="{role}: ", end="\n",
                          role_names=(("system", "System"), ("user", "User"), ("assistant", "Assistant"),
                                      ("tool", "Tool"))),
}


def _encode_run(tokenizer, plain, run: list[tuple[str, bool]], where: str) -> tuple[list[int], list[bool]]:
    """One stretch of plain text, as (text, train) pieces, encoded whole -> its ids and, per id, whether it
    overlaps a trained piece (HF's assistant-token mask marks each token a trained character falls in): by the
    characters each token stands for where the tokenizer reports them (encode_ordinary_spans: SentencePiece,
    whose decode([id]) drops a leading space), else by its bytes (lmforge.infer.detok.exact_bytes: token_bytes or
    stream_bytes, else decode([id])), token after token along the text."""
    text = "".join(t for t, _ in run)
    if not text:
        return [], []
    spans_of = getattr(tokenizer, "encode_ordinary_spans", None)
    if spans_of is not None:
        ids, spans = spans_of(text, where=where)
        size = len
    else:
        ids, spans, at = plain(text, where), [], 0
        for t in ids:
            raw = exact_bytes(tokenizer, t)
            n = len(raw if raw is not None else tokenizer.decode([t]).encode())
            spans.append((at, at + n))
            at += n

        def size(t: str) -> int:  # (in the bytes the tokens hold)
            return len(_normalized(tokenizer, t).encode("utf-8", "surrogatepass"))
    trained, at = [], 0  # the trained pieces' ranges in the run's text
    for t, train in run:
        n = size(t)
        if train:
            trained.append((at, at + n))
        at += n
    return ids, [any(a < stop and start < b for start, stop in trained) for a, b in spans]


def _plain(tokenizer):
    """(text, where) -> its ids as plain text (encode_ordinary: special tokens' text stays text), `where` passed
    on to a tokenizer whose encode_ordinary takes it (SentencePieceBPE) and dropped for others (byte-level BPE
    puts nothing before a text)."""
    encode = getattr(tokenizer, "encode_ordinary", None)
    if encode is None:  # (a byte tokenizer has no specials to parse)
        return lambda text, where: tokenizer.encode(text)
    if takes_where(tokenizer):
        return lambda text, where: encode(text, where=where)
    return lambda text, where: encode(text)


def _normalized(tokenizer, text: str) -> str:
    form = getattr(tokenizer, "normalization", None)  # (Qwen2's NFC: the bytes the tokens hold)
    return unicodedata.normalize(form, text) if form else text


def _opens(add_generation_prompt: bool | None, continue_final_message: bool) -> bool:
    """add_generation_prompt's default: a new assistant turn, unless the last message is continued."""
    return not continue_final_message if add_generation_prompt is None else add_generation_prompt


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def choose_template(tokenizer, asked=None, recorded: str | None = None, plain: str = "template='plain'"
                    ) -> tuple[ChatTemplate, str | None]:
    """The chat template a front end (lmforge chat, LLM.chat, a server) uses: the one asked for (a name or a
    ChatTemplate), else the one a fine-tuned checkpoint records, else chatml where the tokenizer has its
    markers as special tokens, else plain (a pretrained model: chatml's markers would be ordinary text).
    An asked or recorded template whose markers the tokenizer splits is an error naming `plain`, how the
    caller switches. Returns (template, a notice for the fallback to plain or None)."""
    from lmforge.align.data import check_template
    from lmforge.errors import LmforgeError

    chosen = asked if asked is not None else recorded
    template = chosen if isinstance(chosen, ChatTemplate) else get_template(chosen or "chatml")
    try:
        check_template(tokenizer, template, plain=plain)  # its markers must be single special tokens
    except LmforgeError:
        if chosen is not None:
            raise
        return get_template("plain"), "this tokenizer has no chatml special tokens: using the plain template"
    return template, None


def normalize_messages(messages) -> list[dict]:
    """OpenAI-style chat messages in the shape HF chat templates (and the built-in ones) read: a content given as
    a list of parts becomes its text parts joined by newlines (another kind of part, an image, is refused); an
    assistant message with tool_calls and a null or missing content gets content ""; each tool call's
    function.arguments, a JSON string in OpenAI's API, becomes the dict HF's templates write with tojson.
    Messages already in that shape come back equal; the caller's dicts are not changed. LLM.chat and
    chat_request apply it to every conversation."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ConfigError(f"message {i} has a content part of type {kind!r}: only text parts "
                                      "({'type': 'text', 'text': ...}) can be rendered as a prompt")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        if m.get("tool_calls"):
            if content is None:
                m["content"] = ""
            m["tool_calls"] = [_tool_call(call, i, k) for k, call in enumerate(m["tool_calls"])]
        out.append(m)
    return out


def _tool_call(call, i: int, k: int):
    """One OpenAI tool call with its arguments parsed from their JSON string (HF's templates write a dict)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
    except ValueError as e:
        raise ConfigError(f"message {i} tool_calls[{k}] has arguments that are not JSON ({e}): give a JSON "
                          "object string, as OpenAI's API does") from e
    return {**call, "function": {**fn, "arguments": args}}


class ChatRequest(NamedTuple):
    """One conversation as an engine request (chat_request)."""
    prompt_token_ids: list[int]
    params: object
    """the SamplingParams it runs with: the template's stops added, the seed derived for its index"""
    prompt: str
    """the rendered prompt text (a chat answer's RequestOutput.prompt)"""


def chat_request(tokenizer, template: ChatTemplate, conversation, params=None, *,
                 add_generation_prompt: bool | None = None, continue_final_message: bool = False,
                 tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                 index: int | None = None) -> ChatRequest:
    """One conversation (OpenAI- or HF-style messages: normalize_messages) as an engine request: its prompt ids,
    the params it runs with and the rendered text. What LLM.chat and LLM.chat_request run, and what a server
    holding only an Engine or AsyncEngine calls (template: choose_template(tokenizer, asked,
    checkpoint_chat_template(path))[0]). The template encodes the conversation (ChatTemplate.prompt: markers as
    special tokens, contents as plain text, so a message cannot open a turn of its own); its end-of-turn strings
    join params.stop and those that are single special tokens params.stop_token_ids (ChatTemplate.stop_token_ids).
    index: the conversation's place in a batch; a seed then becomes seed_for(seed, index), as LLM.chat gives
    conversation `index` (None: the seed as given, as LLM.submit uses it). The returned params carry the seed
    that runs, for a cache to key on. add_generation_prompt, continue_final_message, tools and
    chat_template_kwargs are ChatTemplate.render's (HF's apply_chat_template's names)."""
    from lmforge.infer.request import seed_for
    from lmforge.infer.sampling import SamplingParams

    if params is None:
        params = SamplingParams.default()
    elif not isinstance(params, SamplingParams):
        raise ConfigError(f"params must be a SamplingParams, got {type(params).__name__} "
                          "(SamplingParams.from_dict turns a dict of options into one)")
    if not isinstance(template, ChatTemplate):
        raise ConfigError(f"template must be a ChatTemplate (get_template(name), choose_template), got "
                          f"{type(template).__name__}")
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise LmforgeError(f"a conversation is a list of {{'role', 'content'}} messages, got {conversation!r:.80}")
    if not conversation:  # OpenAI's API and vLLM's server answer 400; the template would render a bare turn opener
        raise ConfigError("the conversation has no messages: give at least one {'role', 'content'} message")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise LmforgeError("chat_template_kwargs is a dict of the template's variables, e.g. "
                           f"{{'enable_thinking': False}}; got {type(chat_template_kwargs).__name__}")
    reserved = sorted(set(chat_template_kwargs or ()) & {"messages", "add_generation_prompt", "tools", "documents"})
    if reserved:
        raise ConfigError(f"chat_template_kwargs key {reserved[0]!r} is set by chat_request itself; pass it as its "
                          "own argument (tools=, add_generation_prompt=) or drop it")
    text, ids = template.prompt(tokenizer, normalize_messages(conversation), add_generation_prompt,
                                continue_final_message, tools=tools, **(chat_template_kwargs or {}))
    end_ids = template.stop_token_ids(tokenizer)  # a marker that is one special token ends on the token
    changes = dict(stop=tuple(dict.fromkeys(params.stop + template.stop)),
                   stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids + end_ids)))
    if params.seed is not None and index is not None:
        changes["seed"] = seed_for(params.seed, index)
    return ChatRequest(ids, params.derived(**changes), text)


def checkpoint_chat_template(path, base=None) -> str | ChatTemplate | None:
    """The chat template a checkpoint directory carries, without loading it: the one a fine-tuned checkpoint
    records (a TEMPLATES name), else a HF checkpoint's own Jinja (JinjaTemplate), else None; a PEFT adapter's
    without a tokenizer of its own is its base's (an lmforge or HF checkpoint), `base` where given as to
    load_model (checkpoint.template_dir). What LLM.load sets as
    LLM.chat_template, and choose_template's `recorded` for a server built on an Engine."""
    from lmforge.checkpoint import hf_chat_template, recorded_chat_template

    return recorded_chat_template(path, base=base) or hf_chat_template(path, base=base)
