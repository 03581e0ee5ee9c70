"""What the API serves: an export's engine, tokenizer, chat template and serving.json."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from serve.chat_template import ChatTemplate
from serve.engine import Engine
from serve.export_format import ServingSpec, read_export
from serve.images import PatchConfig


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character → byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Per-token strings and raw bytes for logprobs (a token may hold part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        self.byte_level = "ByteLevel" in kinds
        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self.special = {i for i, t in added.items() if t.special}
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if (b := self._cache.get(token_id)) is not None:
            return b
        piece = self.tokenizer.id_to_token(token_id) or ""
        dec = _byte_decoder()
        if token_id in self.special:
            b = piece.encode()
        elif self.byte_level and all(c in dec for c in piece):
            b = bytes(dec[c] for c in piece)
        elif m := _BYTE_TOKEN.match(piece):  # sentencepiece byte fallback
            b = bytes([int(m.group(1), 16)])
        else:
            b = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        self._cache[token_id] = b
        return b

    def text(self, token_id: int) -> str:
        """The token as text; a partial UTF-8 character shows as `bytes:\\xNN…` (as OpenAI)."""
        b = self.bytes(token_id)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


@dataclass
class ServedModel:
    """One export, loaded: `engine` is stepped only by the runner thread."""

    path: Path
    spec: ServingSpec
    engine: Engine
    chat_template: ChatTemplate | None
    token_text: TokenText | None
    created: int = 0
    engine_kwargs: dict = field(default_factory=dict)
    patching: PatchConfig | None = None  # how images become tiles (None: no vision tower)

    @property
    def name(self) -> str:
        return self.spec.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        return min(self.spec.context_length, self.engine.args.max_position_embeddings)

    @classmethod
    def load(cls, export_dir: str | Path, **engine_kwargs) -> ServedModel:
        """Read and validate the export, load its weights into an engine."""
        export = read_export(export_dir)
        engine = Engine.from_pretrained(export.path, **engine_kwargs)
        if engine.tokenizer is None:
            raise FileNotFoundError(f"{export.path} has no tokenizer.json; the API needs one")
        return cls(
            path=export.path,
            spec=export.serving,
            engine=engine,
            chat_template=ChatTemplate.from_dir(export.path),
            token_text=TokenText(engine.tokenizer),
            created=int((export.path / "serving.json").stat().st_mtime),
            engine_kwargs=engine_kwargs,
            patching=PatchConfig.from_model_dir(export.path) if engine.vision else None,
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
