"""Tokenizers without transformers: HF `tokenizers` (tokenizer.json) or SentencePiece (*.model).

Chat templates (`tokenizer_config.json` or `chat_template.jinja`) are applied by transformers'
`apply_chat_template` when transformers is installed, so templates get what they expect from it
(`strftime_now`, HF's `tojson`, kwargs such as Qwen3's `enable_thinking`) and a training run and
inference see byte-identical prompts. Only where transformers is absent are they rendered with a
plain jinja2 sandbox (trim_blocks, lstrip_blocks, `raise_exception`): enough for simple
templates, not for those that call `strftime_now` or rely on HF's `tojson`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# apply_chat_template's own arguments (what the prompt pipeline sets, or what would change what
# it returns): not template variables, so refused as chat-template kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "messages", "chat_template", "add_generation_prompt", "tokenize",
        "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask",
        "padding", "truncation", "max_length", "tokenizer_kwargs", "bos_token", "eos_token",
    }
)  # fmt: skip


def check_template_kwargs(value: Any, where: str) -> dict[str, Any]:
    """Chat-template kwargs (variables the template reads, e.g. {"enable_thinking": False}) as a
    dict; ValueError naming `where` for anything that is not a mapping of variable names."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{where} must be a mapping of template variables (e.g. {{enable_thinking: false}}), "
            f"got {type(value).__name__} {value!r}"
        )
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(
                f"{where}: key {key!r} is not a template variable name; use names such as "
                "enable_thinking"
            )
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(
                f"{where}: {key!r} is an argument of apply_chat_template that the prompt pipeline "
                "sets itself, not a template variable; remove it"
            )
    return dict(value)


def parse_template_kwargs(texts: list[str] | None, where: str) -> dict[str, Any]:
    """Command-line chat-template kwargs: each text a YAML / JSON mapping ('{enable_thinking:
    false}') or one KEY=VALUE pair (VALUE in YAML: 'enable_thinking=false'); later ones win."""
    import yaml

    merged: dict[str, Any] = {}
    for text in texts or []:
        stripped = text.strip()
        try:
            if stripped.startswith("{"):
                value = yaml.safe_load(stripped)
            elif "=" in stripped:
                key, raw = stripped.split("=", 1)
                value = {key.strip(): yaml.safe_load(raw) if raw.strip() else ""}
            else:
                value = stripped  # refused below: not a mapping
        except yaml.YAMLError:
            raise ValueError(
                f"{where} {text!r} is not a YAML mapping; write KEY=VALUE or '{{KEY: VALUE}}'"
            ) from None
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{where} {text!r} is not a mapping; write KEY=VALUE (enable_thinking=false) or "
                "'{KEY: VALUE}'"
            )
        merged.update(check_template_kwargs(value, f"{where} {text!r}"))
    return merged


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """encode / decode / apply_chat_template over a tokenizer directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "tokenizer_config.json"
        self.config: dict[str, Any] = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        tokenizer_json = self.directory / "tokenizer.json"
        sp_models = sorted(self.directory.glob("*.model"))
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(tokenizer_json))
            self._sp = None
        elif sp_models:
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_models[0]))
        else:
            raise ValueError(
                f"{self.directory} has neither tokenizer.json nor a SentencePiece *.model file; "
                "point data.tokenizer at a Hugging Face tokenizer directory"
            )
        # transformers >= 4.43 may save the template beside the config as chat_template.jinja
        template_file = self.directory / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text()
            if template_file.is_file()
            else self.config.get("chat_template")
        )
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        token_id = self._sp.piece_to_id(token)
        return (
            None
            if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id)
            else token_id
        )

    @property
    def eos_token_ids(self) -> list[int]:
        ids = []
        for token in (self.eos_token,):
            if token is not None and self.token_to_id(token) is not None:
                ids.append(self.token_to_id(token))
        if not ids and self._sp is not None and self._sp.eos_id() >= 0:
            ids.append(self._sp.eos_id())
        return ids

    @property
    def pad_token_id(self) -> int:
        for token in (self.pad_token, self.eos_token):
            if token is not None and self.token_to_id(token) is not None:
                return self.token_to_id(token)
        return 0

    # ---- text ----
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        return self._sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids)

    def _transformers_tokenizer(self):
        """transformers' tokenizer of this directory (None without transformers), loaded once."""
        if not hasattr(self, "_hf_full"):
            try:
                from transformers import AutoTokenizer
            except ImportError:
                self._hf_full = None
                return None
            loader = AutoTokenizer
            if "tokenizer_class" not in self.config and self._hf is not None:
                # Without a tokenizer_class AutoTokenizer reads the model's config.json to pick
                # one, and an HF export's config names our remote code (it then fails); the
                # tokenizer.json alone defines a fast tokenizer.
                from transformers import PreTrainedTokenizerFast as loader
            try:
                self._hf_full = loader.from_pretrained(str(self.directory), local_files_only=True)
            except Exception as exc:  # noqa: BLE001  (any loading failure is the directory's)
                raise ValueError(
                    f"{self.directory}: transformers cannot load this tokenizer to apply its "
                    f"chat template ({type(exc).__name__}: {exc}); fix the tokenizer files"
                ) from None
        return self._hf_full

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text of `messages`; `template_kwargs` go to the template (e.g. Qwen3's
        enable_thinking=False)."""
        if not self.chat_template:
            raise ValueError(
                f"{self.directory / 'tokenizer_config.json'} has no chat_template; "
                "set data.chat_template=false to feed prompts as plain text"
            )
        full = self._transformers_tokenizer()
        if full is not None:
            return full.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )
        return _render_chat_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_kwargs,
        )

    def encode_prompt(
        self,
        prompt: str | list[dict[str, str]],
        chat: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A prompt (text or chat messages) as token ids, with the chat template if asked."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
        if chat:
            text = self.apply_chat_template(messages, **(template_kwargs or {}))
            return self.encode(text, add_special_tokens=False)
        text = "\n".join(m["content"] for m in messages)
        return self.encode(text, add_special_tokens=True)


def _render_chat_template(template: str, **variables: Any) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**variables)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
    return Tokenizer(directory)
