"""The OpenAI completions API on a character model: request fields checked, jobs built, responses shaped.

One token is one character (one byte for a `bytes` model). The sampling fields map onto charrnn's
samplers: `temperature: 0` is `greedy`, `top_p` < 1 is `top_p`, the extras `top_k`, `min_p` and
`beam_width` pick `top_k`, `min_p` and `beam`, `sampler` names any registered one, and the values are
then checked by `LoadedModel.options` exactly as `charrnn generate` checks them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from charrnn.errors import CharrnnError
from charrnn.loaded import LoadedModel

from .engine import Event, Group, Job, Scores

DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 64  # prompts times n in one request
MAX_LOGPROBS = 20
MAX_STOP = 16


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


# -- fields -------------------------------------------------------------------------------

#: fields OpenAI defines that a character model cannot honour: accepted at these defaults only
INERT = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
IGNORED = ("user",)
COMPLETION_FIELDS = (
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "echo",
    "stream",
    "stream_options",
    "logprobs",
    "sampler",
    "top_k",
    "min_p",
    "repetition_penalty",
    "beam_width",
    *INERT,
    *IGNORED,
)
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
}
#: extra field -> (the sampler it selects, that sampler's option)
FILTERS = {
    "top_k": ("top_k", "k"),
    "top_p": ("top_p", "p"),
    "min_p": ("min_p", "min_p"),
    "beam_width": ("beam", "beam_width"),
}


def _real(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _int(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise bad(f"{name} must be {span}, got {value!r}", name)
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def check_fields(body: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = [k for k in body if k not in known]
    if unknown:
        raise bad(
            f"unknown field {unknown[0]!r}; this server takes: {', '.join(known)}",
            unknown[0],
            "unknown_field",
        )
    for name, defaults in INERT.items():
        if (
            name in body
            and not any(body[name] == d and type(body[name]) is type(d) for d in defaults if d is not None)
            and body[name] is not None
        ):
            raise bad(
                f"{name} is not supported by a character model (only its default, {defaults[1]!r}, is accepted)",
                name,
                "unsupported_parameter",
            )


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
    """The request's fields checked and turned into a `Job` (4xx `ApiError`s otherwise)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    check_fields(body, COMPLETION_FIELDS)
    name = pick_model(body, models)
    loaded = models[name]
    prompt = body.get("prompt", "")
    if prompt is None:
        prompt = ""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad(
            "prompt must be a string or a non-empty list of strings (a character model takes no token ids)",
            "prompt",
        )
    max_tokens = _int(body, "max_tokens", 0, max_tokens_limit)
    max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit) if max_tokens is None else max_tokens
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    if n * len(prompts) > MAX_CHOICES:
        raise bad(f"n times the number of prompts must be at most {MAX_CHOICES}, got {n * len(prompts)}", "n")
    stream, echo = _bool(body, "stream"), _bool(body, "echo")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or any(k != "include_usage" for k in options):
            raise bad("stream_options takes only include_usage", "stream_options")
        include_usage = _bool(options, "include_usage")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    if seed is not None and seed < 0:
        seed += 2**64  # numpy seeds are unsigned; every int64 still names its own stream
    seed = secrets.randbits(63) if seed is None else seed
    sampler, temperature, sampler_options = sampler_fields(body, loaded)
    groups = []
    for i, text in enumerate(prompts):
        try:
            g, section, seed_, lines = loaded.options(
                num_chars=max_tokens,
                seed_text=text,
                num_samples=n,
                stop=stops,
                seed=seed,
                sampler=sampler,
                temperature=temperature,
                sampler_options=sampler_options,
                labels=LABELS,
            )
            sampler_obj = loaded.assembly.sampler(loaded.vocab.vocab, section, lines)
            if logprobs is not None and hasattr(sampler_obj, "search"):
                raise bad(
                    f"logprobs are not given with sampler {section['type']!r}: it searches whole "
                    "texts instead of sampling one character at a time",
                    "logprobs",
                )
        except CharrnnError as exc:
            message, param = in_request_words(str(exc), loaded.path)
            raise bad(message, param) from None
        groups.append(
            Group(
                prompt=g["seed_text"],
                sampler=sampler_obj,
                rng=np.random.default_rng([seed_, 2] if i == 0 else [seed_, 2, i]),
                n=n,
                num_chars=g["num_chars"],
                stop=[s for s in g["stop"] if s],
                logprobs=logprobs,
                echo=echo,
                first_index=i * n,
                labels={"model": loaded.model_label, "sampler": loaded.assembly.label("sampler", section)},
            )
        )
    return Request(name, prompts, n, max_tokens, stream, include_usage, echo, logprobs, Job(groups, stream))


#: a sampler's option -> the request field that sets it
OPTION_FIELDS = {
    "k": "top_k",
    "p": "top_p",
    "min_p": "min_p",
    "beam_width": "beam_width",
    "temperature": "temperature",
    "repetition_penalty": "repetition_penalty",
    "repetition_window": "repetition_penalty",
}


def in_request_words(message: str, path: str | None) -> tuple[str, str | None]:
    """A validation message as the client should read it: no server path, the field it names.

    A sampler's own check says `k must be ...`: the request called that `top_k`.
    """
    if path:
        message = message.replace(f"checkpoint {path}: ", "")
    found = re.search(r"\b(\w+) must be\b", message)
    if found and found.group(1) in OPTION_FIELDS:
        field_name = OPTION_FIELDS[found.group(1)]
        tail = message[found.start() :]
        return (tail if found.group(1) == field_name else f"{field_name}: {tail}"), field_name
    for field_name in sorted(set(LABELS.values()), key=len, reverse=True):
        if message.startswith(field_name):
            return message, field_name
    return message, None


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
    try:
        return option in inspect.signature(component.factory).parameters
    except (TypeError, ValueError):
        return False


def sampler_fields(
    body: Mapping[str, Any], loaded: LoadedModel
) -> tuple[str | None, float | None, dict[str, Any]]:
    """(sampler name or None for the saved one, temperature, options) from the request's fields."""
    named = body.get("sampler")
    if named is not None and not isinstance(named, str):
        raise bad(f"sampler must be a sampler's name, got {named!r}", "sampler")
    known = loaded.assembly.registry.components["sampler"]
    if named is not None and named not in known:
        raise bad(f"sampler {named!r} is not known; known: {', '.join(sorted(known))}", "sampler")
    temperature = _real(body, "temperature")
    if temperature is not None and temperature < 0:
        raise bad(f"temperature must be >= 0 (0 is greedy), got {temperature}", "temperature")
    filters = {}
    for field_name in FILTERS:
        value = body.get(field_name)
        if value is not None and not (field_name == "top_p" and value == 1 and not isinstance(value, bool)):
            filters[field_name] = value
    if len(filters) > 1:
        a, b = list(filters)[:2]
        raise bad(f"{a} and {b} cannot be combined: a charrnn sampler applies one of them; pick one", b)
    options: dict[str, Any] = {}
    if "repetition_penalty" in body and body["repetition_penalty"] is not None:
        options["repetition_penalty"] = body["repetition_penalty"]
    saved = loaded.config["sampler"]["type"]
    sampler = named
    if filters:
        field_name, value = next(iter(filters.items()))
        wanted, option = FILTERS[field_name]
        if named is not None and not takes(loaded, named, option):
            raise bad(f"{field_name} does not apply to sampler {named!r}", field_name)
        sampler = sampler or wanted
        options[option] = value
    if temperature == 0 and sampler != "beam":
        return "greedy", None, {k: v for k, v in options.items() if k == "repetition_penalty"}
    current = sampler or saved
    if temperature is not None and not takes(loaded, current, "temperature"):
        if named is not None or filters:
            if temperature != 1:
                raise bad(f"temperature does not apply to sampler {current!r}", "temperature")
            temperature = None
        else:
            sampler = "temperature"  # the saved sampler is greedy or beam: temperature asks to sample
    return sampler, temperature, options


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
