"""The OpenAI completions API on a character model: request fields checked, jobs built, responses shaped.

One token is one character (one byte for a `bytes` model). The sampling fields map onto charrnn's
samplers: `temperature: 0` is `greedy`, `top_p` < 1 is `top_p`, the extras `top_k`, `min_p` and
`beam_width` pick `top_k`, `min_p` and `beam`, `sampler` names any registered one, and the values are
then checked by `LoadedModel.options` exactly as `charrnn generate` checks them.
"""

from __future__ import annotations

import functools
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from charrnn import options
from charrnn.engine import Scores
from charrnn.errors import CharrnnError
from charrnn.loaded import LoadedModel
from charrnn.options import Check, Range

from .engine import Event, Job

DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 64  # prompts times n in one request
MAX_LOGPROBS = 20
MAX_STOP = 16
#: characters of one prompt: priming costs about 7 us per character, so 32,768 hold the model ~0.25 s
MAX_PROMPT_CHARS = 32_768
#: candidates of a beam search per request (the sampler alone allows more)
MAX_BEAM_WIDTH = 32
#: beam_width x choices x max_tokens: a search runs alone on the model, so it is bounded to about a second
MAX_SEARCH = 32 * 4096


class ApiError(Exception):
    """A response in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_exceeded",
            505: "invalid_request_error",  # the client's HTTP version: its mistake, not the server's
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# -- the request body: one description, checked by charrnn's option checker ----------------

#: fields OpenAI defines that a character model cannot honour: accepted at these defaults only
INERT = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


def _inert(name: str) -> Check:
    defaults = INERT[name]
    return Check(
        lambda v: v is None or any(v == d and type(v) is type(d) for d in defaults),
        f"its default, {defaults[1]!r} (a character model has no use for {name}: not supported)",
    )


def _short_prompts(value: Any) -> bool:
    prompts = [value] if isinstance(value, str) else value or []
    return all(len(p) <= MAX_PROMPT_CHARS for p in prompts)


@dataclass
class StreamOptions:
    include_usage: Annotated[bool | None, "a last chunk with the usage of the whole request"] = None


@dataclass
class CompletionBody:
    """A `/v1/completions` request: OpenAI's fields, and charrnn's sampler extras."""

    model: Annotated[str | None, "the served model's id (may be left out when one model is served)"] = None
    prompt: Annotated[
        str
        | Annotated[
            list,
            Check(lambda v: all(isinstance(p, str) for p in v), "text: a character model takes no token ids"),
            Check(lambda v: len(v) > 0, "a non-empty list of prompts"),
        ]
        | None,
        Check(_short_prompts, f"at most {MAX_PROMPT_CHARS} characters per prompt"),
        "the text to continue; a list of prompts gives n choices for each",
    ] = ""
    max_tokens: Annotated[
        int | None, Range(ge=0, le=4096), f"characters to generate per choice (default {DEFAULT_MAX_TOKENS})"
    ] = None
    temperature: Annotated[float | None, Range(ge=0, le=100), "0 is greedy"] = None
    top_p: Annotated[float | None, Range(gt=0, le=1), "nucleus sampling (sampler top_p)"] = None
    n: Annotated[int | None, Range(ge=1, le=MAX_CHOICES), "choices per prompt"] = None
    stop: Annotated[
        str | Annotated[list[str], Check(lambda v: len(v) <= MAX_STOP, f"at most {MAX_STOP} strings")] | None,
        "a choice ends just before the first of these it produces",
    ] = None
    seed: Annotated[int | None, "the same seed gives the same text"] = None
    echo: Annotated[bool | None, "the prompt is put before each choice"] = None
    stream: Annotated[bool | None, "server-sent events as the text is made"] = None
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int | None, Range(ge=0, le=MAX_LOGPROBS), "the top-N characters at each position"] = (
        None
    )
    sampler: Annotated[str | None, "any registered sampler, by name (a charrnn extra)"] = None
    top_k: Annotated[
        int | None, Range(ge=1, le=1 << 20), "sample among the k most likely (sampler top_k)"
    ] = None
    min_p: Annotated[float | None, Range(ge=0, le=1), "sampler min_p"] = None
    repetition_penalty: Annotated[float | None, Range(gt=0, le=100), "CTRL-style penalty of repeats"] = None
    beam_width: Annotated[int | None, Range(ge=1, le=MAX_BEAM_WIDTH), "beam search (sampler beam)"] = None
    suffix: Annotated[Any, _inert("suffix")] = None
    best_of: Annotated[Any, _inert("best_of")] = None
    logit_bias: Annotated[Any, _inert("logit_bias")] = None
    presence_penalty: Annotated[Any, _inert("presence_penalty")] = None
    frequency_penalty: Annotated[Any, _inert("frequency_penalty")] = None
    user: Annotated[Any, "accepted and ignored"] = None


_BODY = options.schema_of(CompletionBody)


@functools.lru_cache(maxsize=8)
def body_schema(max_tokens_limit: int) -> options.Schema:
    """The request body's description with this server's `--max-tokens-limit`."""
    field = _BODY["max_tokens"]
    return _BODY.replace("max_tokens", constraints=(Range(ge=0, le=max_tokens_limit),), help=field.help)


#: request field -> the pipeline key it sets (for messages in the request's words)
LABELS = {
    "generate.seed_text": "prompt",
    "generate.num_chars": "max_tokens",
    "generate.num_samples": "n",
    "generate.stop": "stop",
    "seed": "seed",
    "sampler.type": "sampler",
    "sampler.temperature": "temperature",
    "sampler.p": "top_p",
    "sampler.k": "top_k",
    "sampler.min_p": "min_p",
    "sampler.beam_width": "beam_width",
    "sampler.repetition_penalty": "repetition_penalty",
    "sampler.repetition_window": "repetition_penalty",
}
#: extra field -> (the sampler it selects, that sampler's option)
FILTERS = {
    "top_k": ("top_k", "k"),
    "top_p": ("top_p", "p"),
    "min_p": ("min_p", "min_p"),
    "beam_width": ("beam", "beam_width"),
}


@dataclass
class Request:
    """A checked completions request: what the engine runs and how to answer."""

    model: str
    prompts: list[str]
    n: int
    max_tokens: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    job: Job


def parse_completion(body: Any, models: Mapping[str, LoadedModel], max_tokens_limit: int) -> Request:
    """The request's fields checked and turned into a `Job` (4xx `ApiError`s otherwise).

    Each field is checked against `CompletionBody` by charrnn's one option checker, then the
    sampler options by the sampler's own description, as `charrnn generate` checks them: the
    same mistake reads the same, in the request's words, with `param` naming the field.
    """
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        fields = options.check(body_schema(max_tokens_limit), body)
    except options.OptionError as exc:
        raise bad(str(exc), exc.keys[0] if exc.keys else None) from None
    name = pick_model(fields, models)
    loaded = models[name]
    prompt = fields["prompt"]
    prompts = [prompt or ""] if not isinstance(prompt, list) else prompt
    max_tokens = (
        min(DEFAULT_MAX_TOKENS, max_tokens_limit) if fields["max_tokens"] is None else fields["max_tokens"]
    )
    n = fields["n"] or 1
    if n * len(prompts) > MAX_CHOICES:
        raise bad(f"n times the number of prompts must be at most {MAX_CHOICES}, got {n * len(prompts)}", "n")
    stream, echo = bool(fields["stream"]), bool(fields["echo"])
    if fields["stream_options"] is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool((fields["stream_options"] or {}).get("include_usage"))
    logprobs = fields["logprobs"]
    stop = fields["stop"]
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    seed = fields["seed"]
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad(f"seed must be an integer of 64 bits, got {seed}", "seed")
    if seed is not None and seed < 0:
        seed += 2**64  # numpy seeds are unsigned; every int64 still names its own stream
    seed = secrets.randbits(63) if seed is None else seed
    sampler, sampler_options = sampler_fields(fields, loaded)
    width = sampler_options.get("beam_width") or (fields["beam_width"] if sampler == "beam" else None)
    if width is not None and width * n * len(prompts) * max(max_tokens, 1) > MAX_SEARCH:
        raise bad(
            f"beam_width x n x prompts x max_tokens must be at most {MAX_SEARCH:,}: a search holds the model "
            f"for all of it; got {width * n * len(prompts) * max_tokens:,}",
            "beam_width",
        )
    requests = []
    for i, text in enumerate(prompts):
        try:
            request = loaded.request(
                labels=LABELS,
                logprobs=logprobs,
                score_prompt=echo,
                stream_index=i,
                num_chars=max_tokens,
                seed_text=text,
                num_samples=n,
                stop=stops,
                seed=seed,
                sampler=sampler,
                sampler_options=sampler_options,
            )
        except options.OptionError as exc:
            key = ".".join(exc.keys)
            raise bad(
                _unpathed(str(exc), loaded.path), LABELS.get(key, exc.keys[-1] if exc.keys else None)
            ) from None
        except CharrnnError as exc:
            message = _unpathed(str(exc), loaded.path)
            raise bad(message, next((f for f in FIELDS if message.startswith(f"{f}:")), None)) from None
        if logprobs is not None and hasattr(request.sampler, "search"):
            raise bad(
                f"logprobs are not given with sampler {sampler or loaded.config['sampler']['type']!r}: it "
                "searches whole texts instead of sampling one character at a time",
                "logprobs",
            )
        requests.append(request)
    return Request(name, prompts, n, max_tokens, stream, include_usage, echo, logprobs, Job(requests, stream))


#: the request's field names, longest first (to find the one a message begins with)
FIELDS = sorted(_BODY.names(), key=len, reverse=True)


def _unpathed(message: str, path: str | None) -> str:
    """A message as the client should read it: without the server's checkpoint path."""
    return message.replace(f"checkpoint {path}: ", "") if path else message


def pick_model(body: Mapping[str, Any], models: Mapping[str, LoadedModel]) -> str:
    name = body.get("model")
    if name is None and len(models) == 1:
        return next(iter(models))
    if not isinstance(name, str) or name not in models:
        raise ApiError(
            404 if isinstance(name, str) else 400,
            f"model {name!r} is not served here; served: {', '.join(models)}",
            "model",
            "model_not_found",
        )
    return name


def takes(loaded: LoadedModel, sampler: str, option: str) -> bool:
    component = loaded.assembly.registry.components["sampler"].get(sampler)
    if component is None:
        return False
    return option in options.schema_of(component.factory)


def sampler_fields(fields: Mapping[str, Any], loaded: LoadedModel) -> tuple[str | None, dict[str, Any]]:
    """(sampler name or None for the saved one, its options) from the request's checked fields:
    the rules between fields (one filter at a time, what applies to which sampler)."""
    named = fields["sampler"]
    known = loaded.assembly.registry.components["sampler"]
    if named is not None and named not in known:
        raise bad(
            f"sampler: unknown sampler {named!r}{options.suggest(named, known)}; known: {', '.join(sorted(known))}",
            "sampler",
        )
    temperature = fields["temperature"]
    filters = {}
    for field_name in FILTERS:
        value = fields[field_name]
        if value is not None and not (field_name == "top_p" and value == 1):
            filters[field_name] = value
    if len(filters) > 1:
        a, b = list(filters)[:2]
        raise bad(f"{a} and {b} cannot be combined: a charrnn sampler applies one of them; pick one", b)
    chosen: dict[str, Any] = {}
    if fields["repetition_penalty"] is not None:
        chosen["repetition_penalty"] = fields["repetition_penalty"]
    saved = loaded.config["sampler"]["type"]
    sampler = named
    if filters:
        field_name, value = next(iter(filters.items()))
        wanted, option = FILTERS[field_name]
        if named is not None and not takes(loaded, named, option):
            raise bad(f"{field_name} does not apply to sampler {named!r}", field_name)
        sampler = sampler or wanted
        chosen[option] = value
    if temperature == 0 and sampler != "beam":
        return "greedy", {k: v for k, v in chosen.items() if k == "repetition_penalty"}
    current = sampler or saved
    if temperature is not None and not takes(loaded, current, "temperature"):
        if named is not None or filters:
            if temperature != 1:
                raise bad(f"temperature does not apply to sampler {current!r}", "temperature")
            temperature = None
        else:
            sampler = "temperature"  # the saved sampler is greedy or beam: temperature asks to sample
    if temperature is not None:
        chosen["temperature"] = temperature
    return sampler, chosen


# -- responses ----------------------------------------------------------------------------


def completion_id(chat: bool = False) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def completion(
    request: Request, finished: Mapping[int, Event], loaded: LoadedModel, chat: bool
) -> dict[str, Any]:
    """The whole response: a choice per finished row (`finish` events by choice index), the usage."""
    choices: list[dict[str, Any]] = []
    completion_chars = 0
    for index in sorted(finished):
        event = finished[index]
        prompt = request.prompts[index // request.n]
        completion_chars += len(event.text)
        text = prompt + event.text if request.echo else event.text
        if chat:
            message = {"role": "assistant", "content": text}
            choices.append(
                {"index": index, "message": message, "logprobs": None, "finish_reason": event.reason}
            )
        else:
            logprobs = None
            if request.logprobs is not None:
                logprobs = logprobs_shape(loaded, event.scores, event.prompt_scores, text, request.echo, 0)
            choices.append(
                {"text": text, "index": index, "logprobs": logprobs, "finish_reason": event.reason}
            )
    return {
        "id": completion_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": request.model,
        "choices": choices,
        "usage": usage(sum(len(p) for p in request.prompts), completion_chars),
        "system_fingerprint": None,
    }


class Chunks:
    """The chunks of one streamed response in OpenAI's shapes: a piece of a choice's text, its last
    chunk (finish reason, logprobs), the usage chunk. One id and `created` for all of them."""

    def __init__(self, request: Request, loaded: LoadedModel, chat: bool) -> None:
        self.request, self.loaded, self.chat = request, loaded, chat
        self.id, self.created = completion_id(chat), now()
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.started: set[int] = set()  # choices with a chunk out: the prompt and chat's role go first
        self.completion_chars = 0

    def of(self, event: Event) -> dict[str, Any]:
        """The chunk of a `text` or `finish` event (a finish's text was streamed already)."""
        request, index = self.request, event.index
        prompt = request.prompts[index // request.n] if request.echo else ""
        head = prompt if index not in self.started else ""  # the echoed prompt comes first
        if event.kind == "text":
            self.completion_chars += len(event.text)
            return self._chunk(index, head + event.text, None, None)
        logprobs = None
        if request.logprobs is not None and not self.chat:
            logprobs = logprobs_shape(
                self.loaded, event.scores, event.prompt_scores, prompt + event.text, request.echo, 0
            )
        return self._chunk(index, head, event.reason, logprobs)

    def usage_chunk(self) -> dict[str, Any] | None:
        """The last chunk, with `stream_options.include_usage`: no choices, the usage."""
        if not self.request.include_usage:
            return None
        prompt_chars = sum(len(p) for p in self.request.prompts)
        return {**self._head(), "choices": [], "usage": usage(prompt_chars, self.completion_chars)}

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.request.model}

    def _chunk(self, index: int, text: str, reason: str | None, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if index not in self.started:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        self.started.add(index)
        out = {**self._head(), "choices": [choice]}
        if self.request.include_usage:
            out["usage"] = None
        return out


def token_text(loaded: LoadedModel, i: int) -> str:
    """One token as text: a character, or for a byte model its character or `bytes:\\xNN`."""
    if loaded.vocab.encoding == "bytes":
        return chr(i) if i < 0x80 else f"bytes:\\x{i:02x}"
    return loaded.vocab.vocab[i]


def logprobs_shape(
    loaded: LoadedModel,
    scores: Scores | None,
    prompt_scores: Scores | None,
    text: str,
    echo: bool,
    start: int,
) -> dict[str, Any]:
    """OpenAI's completions `logprobs` for one choice: per character, the chosen one's
    log-probability and the top-N alternatives; `text_offset` counts from the choice's text.

    With `echo`, the prompt's characters come first (the first has no log-probability). With
    `max_tokens: 0` the distribution after the prompt is added as `next_top_logprobs` (a charrnn
    extension: OpenAI's shape has no slot for a distribution without a chosen token).
    """
    parts = [prompt_scores] if echo and prompt_scores is not None else []
    if scores is not None:
        parts.append(scores)
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for part in parts:
        for i, lp, tops in zip(part.ids, part.logprobs, part.tops, strict=True):
            token = token_text(loaded, i)
            out["tokens"].append(token)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if tops is None else {token_text(loaded, j): v for j, v in tops})
            out["text_offset"].append(offset)
            offset += len(token) if not token.startswith("bytes:") else 0
    if len(out["tokens"]) > len(text) - start and loaded.vocab.encoding != "bytes":  # cut at a stop string
        keep = len(text) - start
        out = {k: v[:keep] for k, v in out.items()}
    if prompt_scores is not None and prompt_scores.next_top is not None:
        out["next_top_logprobs"] = {token_text(loaded, j): v for j, v in prompt_scores.next_top}
    return out


def usage(prompt_chars: int, completion_chars: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_chars,
        "completion_tokens": completion_chars,
        "total_tokens": prompt_chars + completion_chars,
    }


def now() -> int:
    return int(time.time())
