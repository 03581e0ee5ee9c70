"""Incremental detokenization with stop strings held back until they are ruled out."""

from __future__ import annotations

from collections.abc import Sequence


def special_token_texts(tokenizer) -> dict[int, str]:
    """{id: text} of the special tokens that `decode(..., skip_special_tokens=True)` drops.

    Works for a `tokenizers.Tokenizer` (the engine's) and a transformers tokenizer.
    """
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        added = tokenizer.get_added_tokens_decoder()
    else:
        added = getattr(tokenizer, "added_tokens_decoder", {})
    return {int(i): t.content for i, t in added.items() if t.special}


class TextStream:
    """Turns a growing list of token ids into text deltas, stopping at any of `stop`.

    Decodes only a short window of recent tokens per step (so the cost does not grow with the
    output), holds back an incomplete UTF-8 character, and holds back any tail that could
    still become a stop string, so a stop string is never streamed.

    Stop strings match the text *with* special tokens (`stop=["<|im_end|>"]` fires when the
    model emits that token, "<|im_end|>\n" on it and a newline); the streamed text leaves
    special tokens out, as `decode(skip_special_tokens=True)` does.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        # everything decoded so far (complete characters only), special tokens' text included
        # when there are stop strings; `_hidden` holds those spans, never streamed
        self.text = ""
        self.sent = 0  # characters of `text` already returned
        self._prefix, self._read = 0, 0  # decode window, as in vLLM/TGI
        self._specials = special_token_texts(tokenizer) if self.stop else {}
        self._hidden: list[tuple[int, int]] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (new text to emit, whether a stop string was hit)."""
        self.ids.append(token_id)
        special = self._specials.get(token_id)
        if special is not None:  # the decode window skips it; stop strings see its text
            self._hidden.append((len(self.text), len(self.text) + len(special)))
            self.text += special
        else:
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before) :]
                self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self._prefix = self._read = len(self.ids)  # nothing after a stop string
                return self._emit(0), True
        return self._emit(self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, hold: int) -> str:
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self._visible(self.sent, end), end
        return delta

    def _visible(self, start: int, end: int) -> str:
        """text[start:end] without the special tokens' spans."""
        pieces, pos = [], start
        for a, b in self._hidden:
            if b <= pos:
                continue
            if a >= end:
                break
            pieces.append(self.text[pos:a])
            pos = b
        pieces.append(self.text[pos:end])
        self._hidden = [(a, b) for a, b in self._hidden if b > end]  # the rest is sent
        return "".join(pieces)

    def flush(self) -> str:
        """All text not yet emitted (call when the sequence finishes)."""
        if self._read < len(self.ids):  # trailing bytes of an incomplete character
            before = self._decode(self.ids[self._prefix : self._read])
            self.text += self._decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._emit(0)
