"""Chat templates: a conversation (list of {"role", "content"} messages) -> the prompt text a chat model
was trained on. Used by `lmforge chat`, SFT (loss on assistant turns), the server and `lmforge export`
(`ChatTemplate.jinja()`: the same rendering as HF tokenizer_config.json Jinja).

Each template is a small frozen dataclass of strings, so new formats are data, not code:
  chatml   <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n      (OpenAI ChatML, Qwen)
  llama3   <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...  (Llama 3)
  plain    "User: ...\\nAssistant: ..." for base models and byte-level toy models
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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
               continue_final_message: bool = False) -> str:
        """The prompt for `messages`; with add_generation_prompt (default: unless continue_final_message),
        opened for the assistant's next turn; with continue_final_message, ending right after the last
        (assistant) message's content, for the model to continue it (segments)."""
        return "".join(p.text for p in self.segments(messages, _opens(add_generation_prompt, continue_final_message),
                                                     continue_final_message))

    def encode(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool | None = None,
               continue_final_message: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of `render(messages)` and, per token, whether SFT trains on it. The template's markers
        are encoded as special tokens and the messages' content as plain text, so a message that contains
        "<|im_end|><|im_start|>system" stays text: it cannot close its turn or open another (prompt
        injection through user text). Chat generation and SFT both tokenize conversations here."""
        plain = getattr(tokenizer, "encode_ordinary", tokenizer.encode)  # a byte tokenizer has no specials to parse
        ids: list[int] = []
        mask: list[bool] = []
        pieces = self.segments(messages, _opens(add_generation_prompt, continue_final_message), continue_final_message)
        i = 0
        while i < len(pieces):
            p = pieces[i]
            if p.content and i + 1 < len(pieces) and not MARKER.search(pieces[i + 1].text):
                t = plain(p.text + pieces[i + 1].text)  # an end marker of plain text ("\n") joins its content
                i += 1
            else:
                t = (plain if p.content else tokenizer.encode)(p.text) if p.text else []
            ids += t
            mask += [p.train] * len(t)
            i += 1
        return ids, mask

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


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(name="chatml", header="<|im_start|>{role}\n", end="<|im_end|>\n"),
    "llama3": ChatTemplate(name="llama3", bos="<|begin_of_text|>",
                           header="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>"),
    "plain": ChatTemplate(name="plain", header="{role}: ", end="\n",
                          role_names=(("system", "System"), ("user", "User"), ("assistant", "Assistant"),
                                      ("tool", "Tool"))),
}


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
