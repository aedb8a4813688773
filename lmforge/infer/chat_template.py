"""Chat templates: a conversation (list of {"role", "content"} messages) -> the prompt text a chat model
was trained on. Used by `lmforge chat`, SFT (loss on assistant turns) and the server.

Each template is a small frozen dataclass of strings, so new formats are data, not code:
  chatml   <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n      (OpenAI ChatML, Qwen)
  llama3   <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...  (Llama 3)
  plain    "User: ...\\nAssistant: ..." for base models and byte-level toy models
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")


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

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; with add_generation_prompt, opened for the assistant's next turn."""
        return "".join(p for p, _ in self.segments(messages, add_generation_prompt))

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
                 ) -> list[tuple[str, bool]]:
        """(text, is_assistant_content) pieces of the rendered conversation: SFT masks the loss to the
        pieces marked True (an assistant's content and its end marker)."""
        out = [(self.bos, False)] if self.bos else []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ConfigError(f"message {i} has role {role!r}; choose one of {ROLES}")
            if not isinstance(content, str):
                raise ConfigError(f"message {i} content must be a string, got {type(content).__name__}")
            out.append((self.header.format(role=self.role(role)), False))
            out.append((content + self.end, role == "assistant"))
        if add_generation_prompt:
            out.append((self.header.format(role=self.role("assistant")), False))
        return out

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn during generation."""
        stops = [self.end.strip() or self.end]
        nxt = self.header.split("{role}")[0]
        if nxt.strip():
            stops.append(nxt.strip())
        if self.name == "plain":
            stops = ["\nUser:"]
        return tuple(dict.fromkeys(stops))


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(name="chatml", header="<|im_start|>{role}\n", end="<|im_end|>\n"),
    "llama3": ChatTemplate(name="llama3", bos="<|begin_of_text|>", header="<|start_header_id|>{role}<|end_header_id|>\n\n",
                           end="<|eot_id|>"),
    "plain": ChatTemplate(name="plain", header="{role}: ", end="\n",
                          role_names=(("system", "System"), ("user", "User"), ("assistant", "Assistant"),
                                      ("tool", "Tool"))),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
