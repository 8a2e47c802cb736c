"""One request's life in the engine: prompt ids in, text deltas out, and why it ended.

The engine thread feeds each new token to `Generation.push`, which keeps the answer's ids and
text and decides when it ends:

    eos (or pad)   the token ends the answer and is not part of it ("stop"), unless ignore_eos;
                   the same stop ids as eval's `decode_answer`, so greedy answers match eval's
    stop string    the text is cut before the first occurrence of any stop string ("stop")
    max_tokens     the answer has max_tokens tokens ("length")

Text goes out as deltas: the answer's text so far (the tokenizer's decode of all its ids) minus
what was sent. While the answer runs, a tail that may still change is held back: the last
len(longest stop) - 1 characters (they may start a stop string) and trailing U+FFFD (a
multi-byte character whose bytes have not all arrived).

Events reach the request's asyncio queue through `loop.call_soon_threadsafe`, so the engine
thread never touches the event loop's state directly:

    gen = Generation(prompt_ids, SamplingParams(max_tokens=16), tokenizer, stop_ids, loop, seed=0)
    ... engine thread: gen.push(token) ...
    event = await gen.events.get()      # TextDelta | Finished | Failed
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the decoder (OpenAI's parameter names and defaults)."""

    max_tokens: int  # answer tokens at most
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept (1: all)
    top_k: int = 0  # most likely tokens kept (0: all)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    seed: int | None = None  # sampling seed (None: a random one)
    ignore_eos: bool = False  # keep going past eos until max_tokens or a stop string


class RequestError(ValueError):
    """A request the engine cannot take: HTTP `status` with an OpenAI error `code`/`param`."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class QueueFull(RequestError):
    def __init__(self, limit: int):
        super().__init__(f"the server's queue is full ({limit} requests waiting for a slot); retry later",
                         429, "queue_full")


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str  # the server failed this request (an internal error): HTTP 500


class Generation:
    """The state of one request; `push` is called by the engine thread only."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, stop_ids, loop, *, seed: int,
                 model_id: str = "", route=None):
        self.id = next(_ids)
        self.created = int(time.time())
        self.prompt_ids, self.params, self.seed = list(prompt_ids), params, seed
        self.model_id, self.route = model_id, route
        self.tokenizer, self.stop_ids, self.loop = tokenizer, frozenset(stop_ids), loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.produced = 0  # tokens drawn so far, eos included: the next token's index
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        self.cancelled = False  # set by the client's side; the engine frees the slot
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _finish(self, reason: str) -> bool:
        if self.sent < len(self.text):
            self._emit(TextDelta(self.text[self.sent:]))
            self.sent = len(self.text)
        self.finish_reason = reason
        self._emit(Finished(reason, len(self.prompt_ids), len(self.ids)))
        return True

    def push(self, token: int) -> bool:
        """Add the next token; True when the answer has ended."""
        self.produced += 1
        if token in self.stop_ids and not self.params.ignore_eos:
            return self._finish("stop")
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if cuts:
            self.text = text[: min(cuts)]
            return self._finish("stop")
        self.text = text
        if len(self.ids) >= self.params.max_tokens:
            return self._finish("length")
        safe = len(text) - self._hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self.sent:
            self._emit(TextDelta(text[self.sent:safe]))
            self.sent = safe
        return False

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self._emit(Failed(message))
