"""Chat templates: a conversation (list of {"role", "content"} messages) -> the prompt text a chat model
was trained on. Used by `lmforge chat`, SFT (loss on assistant turns), the server and `lmforge export`
(`ChatTemplate.jinja()`: the same rendering as HF tokenizer_config.json Jinja).

Each template is a small frozen dataclass of strings, so new formats are data, not code:
  chatml   <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n      (OpenAI ChatML, Qwen)
  llama3   <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...  (Llama 3)
  plain    "User: ...\\nAssistant: ..." for base models and byte-level toy models
A HF checkpoint's own Jinja template (JinjaTemplate) is rendered with jinja2, for generation.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from lmforge.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
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
               documents: list[dict] | None = None, **template_kwargs) -> tuple[list[int], list[bool]]:
        """Token ids of `render(messages)` and, per token, whether SFT trains on it. The template's markers that
        are single tokens of this tokenizer are encoded as special tokens, the plain text of each message between
        them (header, content, end string) in one piece, so the ids are those of HF's apply_chat_template on
        jinja() (which tokenizes the rendered text whole; only whitespace ending a message may split otherwise)
        while the tokens of the first messages are those of those messages alone (SFT's prompt-completion
        records take the prompt's ids as a prefix: lmforge.align.data), and a message that contains
        "<|im_end|><|im_start|>system" stays text: it cannot close its turn or open another (prompt injection
        through user text). A token is trained when it overlaps a trained piece (an assistant's content or end
        marker: HF's assistant-token mask does the same), so " Hi" after a plain "Assistant:" header is trained.
        No BOS is added beyond the template's own (HF: add_special_tokens=False). Chat generation and SFT both
        tokenize conversations here."""
        self._no_variables(tools, documents, template_kwargs)
        plain = getattr(tokenizer, "encode_ordinary", tokenizer.encode)  # a byte tokenizer has no specials to parse
        pieces = self.segments(messages, _opens(add_generation_prompt, continue_final_message), continue_final_message)
        ids: list[int] = []
        mask: list[bool] = []
        run: list[tuple[str, bool]] = []  # the plain text since the last special marker: (text, train) pieces

        def flush() -> None:
            t, m = _encode_run(tokenizer, plain, run)
            ids.extend(t)
            mask.extend(m)
            run.clear()

        for k, p in enumerate(pieces):
            if k and not p.content and not pieces[k - 1].content:  # a header: each message is a run of its own
                flush()
            parts = [p.text] if p.content else MARKER.split(p.text)
            markers = [] if p.content else MARKER.findall(p.text)
            for j, part in enumerate(parts):
                run.append((part, p.train))
                if j < len(markers):
                    one = tokenizer.encode(markers[j])
                    if len(one) == 1:  # a special token of this tokenizer (else plain text, in the run)
                        flush()
                        ids.append(one[0])
                        mask.append(p.train)
                    else:
                        run.append((markers[j], p.train))
        flush()
        return ids, mask

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
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ConfigError(f"message {i} has role {role!r}; choose one of {ROLES}")
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
        messages = [dict(m) for m in messages]
        tag = "\x00lmforge-continue\x00"  # cut after the last content: what transformers does with its own tag
        if continue_final_message:
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ConfigError("continue_final_message needs the conversation to end with a message whose "
                                  "content is a string")
            messages[-1]["content"] += tag
        # (transformers: the special tokens, then the caller's variables over them)
        text = _compiled(self.source).render(messages=messages, add_generation_prompt=opens, tools=tools,
                                             documents=documents, **{**dict(self.tokens), **template_kwargs})
        if continue_final_message:
            if tag not in text:
                raise ConfigError(f"chat template {self.name!r} does not write the last message's content, so it "
                                  "cannot be continued")
            text = text[:text.rindex(tag)]
        return text

    def encode(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> tuple[list[int], list[bool]]:
        ids = tokenizer.encode(self.render(messages, add_generation_prompt, continue_final_message, tools=tools,
                                           documents=documents, **template_kwargs))
        return ids, [False] * len(ids)

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


def _encode_run(tokenizer, plain, run: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """One stretch of plain text, as (text, train) pieces, encoded whole -> its ids and, per id, whether it
    overlaps a trained piece (by byte offsets: HF's assistant-token mask marks each token a trained character
    falls in)."""
    text = "".join(t for t, _ in run)
    if not text:
        return [], []
    spans, at = [], 0  # the trained pieces' byte ranges in the run's text
    for t, train in run:
        n = len(_normalized(tokenizer, t).encode("utf-8", "surrogatepass"))
        if train:
            spans.append((at, at + n))
        at += n
    ids, mask, at = plain(text), [], 0
    for t in ids:
        n = len(_token_bytes(tokenizer, t))
        mask.append(any(a < at + n and at < b for a, b in spans))
        at += n
    return ids, mask


def _normalized(tokenizer, text: str) -> str:
    form = getattr(tokenizer, "normalization", None)  # (Qwen2's NFC: the bytes the tokens hold)
    return unicodedata.normalize(form, text) if form else text


def _token_bytes(tokenizer, token: int) -> bytes:
    return tokenizer.token_bytes(token) if hasattr(tokenizer, "token_bytes") else tokenizer.decode([token]).encode()


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
