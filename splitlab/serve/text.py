"""Detokenising a stream of tokens, and stop strings.

``TextStream.add(token_ids)`` returns the new text those tokens complete. It decodes a
sliding window (the tokens since the last text it could read, plus a few before them for
context), as vLLM and TGI do, so each token costs O(1), and it holds back text that
might still change: a byte sequence not yet complete (``\\ufffd`` at the end) and any tail
that could be the start of a stop string. When a stop string appears, the text ends just
before it and ``stopped`` is set: the caller ends the request (``finish_reason`` "stop").
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Incremental text of one request's output tokens (special tokens skipped)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # every character decoded so far (sent or held back)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False
        self._prefix = 0  # ids[prefix:read] decode to the context before the new tokens
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> None:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """The text that may be sent now (``final``: the last tokens, nothing held back)."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        self._advance()
        if final and self._read < len(self.ids):  # an incomplete byte sequence at the very end
            tail = self._decode(self.ids[self._prefix:])
            before = self._decode(self.ids[self._prefix:self._read])
            self.text += tail[len(before):]
            self._read = len(self.ids)
        end = len(self.text)
        cut = self._find_stop()
        if cut is not None:
            self.text, end, self.stopped = self.text[:cut], cut, True
        elif not final:
            end -= self._held_back()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _find_stop(self) -> int | None:
        """Where the first stop string starts in the unsent text (None: nowhere)."""
        if not self.stop:
            return None
        start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        tail = self.text[self.sent:]
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if s.startswith(tail[-n:]):
                    longest = n
                    break
        return longest
