"""Where regenerated answers come from: an OpenAI-compatible server, or transformers locally.

Both backends offer ``await backend.complete(messages, params) -> Completion`` and raise
:class:`RequestError` (with ``retryable``) on failure; retrying is the caller's job.

* :class:`OpenAIBackend` — the ``openai`` client against one or more servers (SGLang,
  vLLM, llama.cpp …); each request goes to the server with the fewest requests in flight.
* :class:`HFBackend` — batched ``generate`` with transformers on the local machine, the
  slow path for users without an inference server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from deepspec.errors import DataError
from deepspec.targets.resolve import resolve_target


class RequestError(Exception):
    """One failed generation request."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass
class SamplingParams:
    """Sampling settings; ``None`` leaves a setting to the server's default."""

    temperature: float = 0.8
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int = 4096
    enable_thinking: bool | None = None  # chat_template_kwargs.enable_thinking; None = not sent

    def openai_kwargs(self) -> dict[str, Any]:
        """Arguments of ``chat.completions.create`` (non-standard ones in ``extra_body``)."""
        kwargs: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        extra: dict[str, Any] = {}
        if self.top_k is not None:
            extra["top_k"] = self.top_k
        if self.min_p is not None:
            extra["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            # vLLM / SGLang read repetition_penalty, llama.cpp reads repeat_penalty
            extra["repetition_penalty"] = self.repetition_penalty
            extra["repeat_penalty"] = self.repetition_penalty
        if self.enable_thinking is not None:
            extra["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


@dataclass
class Completion:
    text: str  # the assistant message (reasoning, when returned separately, wrapped in <think>)
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


ADDRESS_FORM = "HOST:PORT such as 127.0.0.1:30000, or a URL such as http://HOST:PORT/v1"


def parse_address(address: str) -> str:
    """``HOST:PORT`` or an ``http(s)://`` URL → the API base URL ending in ``/v1``.

    A typo (a port that is not a number from 1 to 65535, no host, no port) is a
    :class:`DataError` naming the address and the expected form."""
    import urllib.parse

    text = address.strip().rstrip("/")
    if not text:
        raise DataError(f"empty --server-address (expected {ADDRESS_FORM})")
    url = text if "://" in text else "http://" + text
    problem = ""
    try:
        parts = urllib.parse.urlsplit(url)
        hostname = parts.hostname  # parses a bracketed IPv6 host: "[zz]" raises
    except ValueError as exc:  # "http://[::1" (an unclosed bracket), a bad IPv6 address
        problem = f"not a valid URL ({' '.join(str(exc).split())})"
        if "[" in text and "]" not in text:
            problem += "; close the IPv6 address's bracket, e.g. http://[::1]:30000"
        raise DataError(f"--server-address {address!r}: {problem} (expected {ADDRESS_FORM})") from None
    if parts.scheme not in ("http", "https"):
        problem = f"scheme {parts.scheme!r} is not http or https"
    elif not hostname:
        problem = "no host"
    elif any(c.isspace() for c in hostname):
        problem = f"host {hostname!r} contains whitespace"
    else:
        netloc_port = parts.netloc.rpartition("]")[2].rpartition(":")
        port_text = netloc_port[2] if netloc_port[1] else ""
        if not port_text and "://" not in text:
            problem = "no port"
        elif port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
            problem = f"port {port_text!r} is not a number from 1 to 65535"
        elif ":" in netloc_port[0].rpartition("@")[2] and "]" not in parts.netloc:
            problem = (
                "more than one ':' after the host (an IPv6 address goes in brackets: http://[::1]:30000)"
            )
        elif parts.query or parts.fragment:
            problem = "a query or fragment is not expected"
    if problem:
        raise DataError(f"--server-address {address!r}: {problem} (expected {ADDRESS_FORM})")
    return url if url.endswith("/v1") else url + "/v1"


def public_model_name(name: str) -> str:
    """The model name recorded in output rows: a local path becomes its base name.

    llama.cpp reports the absolute path of its GGUF file as the model name; rows shared
    with others must not carry local directory names."""
    text = name.strip().rstrip("/\\")
    is_path = (
        os.path.isabs(text)
        or text.startswith(("~", "./", "../", ".\\"))
        or (len(text) > 2 and text[1] == ":" and text[2] in "/\\")  # a Windows drive path
        or text.lower().endswith(".gguf")
        or os.path.exists(os.path.expanduser(text))  # a local directory given as the model
    )
    return re.split(r"[/\\]", text)[-1] if is_path else text


def _model_key(name: str) -> str:
    """What two model names must share to name the same model (paths and .gguf ignored)."""
    base = re.split(r"[/\\]", name.strip().rstrip("/\\"))[-1]
    return base[:-5] if base.lower().endswith(".gguf") else base


def same_model(a: str, b: str) -> bool:
    """``--model Qwen/Qwen3-4B`` matches a server listing ``/models/Qwen3-4B``; a GGUF file
    name matches the absolute path llama.cpp lists."""
    return a == b or _model_key(a) == _model_key(b)


@contextlib.contextmanager
def _without_openai_environment() -> Iterator[None]:
    """Hide ``OPENAI_*`` variables while clients are built.

    The ``openai`` client would otherwise send ``OPENAI_API_KEY``, the organisation and
    project ids and ``OPENAI_CUSTOM_HEADERS`` to every ``--server-address``; a key is sent
    only when asked for (``--api-key-env``)."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OPENAI_")}
    try:
        yield
    finally:
        os.environ.update(hidden)


class OpenAIBackend:
    """Chat completions through the ``openai`` client, spread over several servers.

    ``api_key`` is sent as the bearer token to every server; the default ``"EMPTY"``
    (what local servers expect) sends no real key."""

    def __init__(
        self, addresses: list[str], model: str | None, *, timeout: float, api_key: str | None = None
    ) -> None:
        import openai

        if not addresses:
            raise DataError(f"no --server-address given (expected {ADDRESS_FORM})")
        self.addresses = list(addresses)
        self.urls = [parse_address(a) for a in addresses]
        self.model = model
        self.timeout = timeout
        self.record_name: str | None = None
        self.request_models: list[str] = [model or "default"] * len(self.urls)
        with _without_openai_environment():
            self.clients = [
                openai.AsyncOpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout)
                for url in self.urls
            ]
        self.in_flight = [0] * len(self.clients)
        self._tie = itertools.count()

    async def _list_models(self, index: int) -> list[str]:
        import openai

        address, client = self.addresses[index], self.clients[index]
        fix = "start it (scripts/data/launch_server.sh) or check --server-address"
        try:
            page = await client.models.list(timeout=min(self.timeout, 30.0))
        except openai.APITimeoutError:
            raise DataError(
                f"the server at {address} did not answer GET /v1/models in time ({fix})"
            ) from None
        except openai.APIConnectionError as exc:
            why = _connection_problem(exc)
            raise DataError(f"cannot reach the server at {address} ({why}): {fix}") from None
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise DataError(
                    f"the server at {address} refused the request (HTTP {exc.status_code}): it wants an API key; "
                    "put it in an environment variable and pass --api-key-env NAME"
                ) from None
            raise DataError(
                f"the server at {address} answered GET /v1/models with HTTP {exc.status_code}: "
                "is it an OpenAI-compatible server? check --server-address"
            ) from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise DataError(
                f"the server at {address} answered GET /v1/models with something other than a model list "
                f"({_short(str(exc), 80)}): check --server-address"
            ) from None
        ids = [str(m.id) for m in getattr(page, "data", None) or [] if getattr(m, "id", None)]
        if not ids:
            raise DataError(f"the server at {address} lists no models: check that it finished loading one")
        return ids

    async def resolve_model(self) -> str:
        """Ask every server for its models before anything is written; return the model
        name recorded in the output rows.

        Every server must answer. With ``--model`` each must list it (a GGUF path matches
        its file name); without, all must serve the same model, whose name (a local path's
        base name) is recorded. Raises :class:`DataError` with one line otherwise."""
        if self.record_name is not None:
            return self.record_name
        listed = [await self._list_models(i) for i in range(len(self.clients))]
        if self.model:
            for i, ids in enumerate(listed):
                match = next((m for m in ids if same_model(self.model, m)), None)
                if match is None:
                    raise DataError(
                        f"the server at {self.addresses[i]} serves {public_model_name(ids[0])!r}, not --model "
                        f"{self.model!r}: pass the model it serves (or leave --model out), or start the server "
                        f"with {self.model}"
                    )
                self.request_models[i] = match
            self.record_name = public_model_name(self.model)
        else:
            first = listed[0][0]
            for i, ids in enumerate(listed):
                if not same_model(first, ids[0]):
                    raise DataError(
                        f"the servers serve different models ({public_model_name(first)!r} at {self.addresses[0]}, "
                        f"{public_model_name(ids[0])!r} at {self.addresses[i]}): pass --model to choose one, "
                        "or give only addresses of servers of the same model"
                    )
                self.request_models[i] = ids[0]
            self.record_name = public_model_name(first)
        return self.record_name

    def _pick(self) -> int:
        tie = next(self._tie)
        n = len(self.clients)
        return min(range(n), key=lambda i: (self.in_flight[i], (i - tie) % n))

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams) -> Completion:
        import openai

        index = self._pick()
        self.in_flight[index] += 1
        url = self.urls[index]
        try:
            response = await self.clients[index].chat.completions.create(
                model=self.request_models[index], messages=messages, **params.openai_kwargs()
            )
        except openai.APITimeoutError:
            raise RequestError(f"{url}: timed out after {self.timeout:g}s", retryable=True) from None
        except openai.APIConnectionError as exc:
            raise RequestError(f"{url}: connection failed ({exc})", retryable=True) from None
        except openai.APIStatusError as exc:
            code = exc.status_code
            retryable = code in (408, 409, 429) or code >= 500
            raise RequestError(f"{url}: HTTP {code}: {_short(exc.message)}", retryable=retryable) from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            raise RequestError(f"{url}: invalid response ({_short(str(exc))})", retryable=True) from None
        finally:
            self.in_flight[index] -= 1
        return _completion_from_response(response, url)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _connection_problem(exc: BaseException) -> str:
    """The operating system's words for a failed connection (e.g. "Connection refused")."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for candidate in (current, *(getattr(current, "exceptions", ()) or ())):  # groups of attempts
            if isinstance(candidate, OSError) and (candidate.errno or candidate.strerror):
                code = candidate.errno if isinstance(candidate.errno, int) else 0
                return os.strerror(code) if code > 0 else str(candidate.strerror or candidate)
        current = current.__cause__ or current.__context__
    return _short(str(exc), 120)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _completion_from_response(response: Any, url: str) -> Completion:
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise RequestError(f"{url}: response has no choices", retryable=True)
    message = choices[0].message
    content = message.content
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    if content is None and not reasoning:
        raise RequestError(f"{url}: response has no message content", retryable=True)
    text = content or ""
    if reasoning:
        text = f"<think>\n{reasoning.strip()}\n</think>\n\n{text.lstrip()}"
    usage = getattr(response, "usage", None)
    return Completion(
        text=text,
        finish_reason=choices[0].finish_reason,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


class HFBackend:
    """Batched local generation with transformers (slow; no server needed).

    Requests that arrive while a batch runs are collected into the next batch of up to
    ``batch_size`` prompts (left padding, one ``generate`` call).
    """

    def __init__(self, target: str, *, batch_size: int = 8, dtype: str = "bf16", seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = resolve_target(target)
        self.model_name = public_model_name(target)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        self.batch_size = batch_size
        torch.manual_seed(seed)
        self._pending: list[tuple[list[dict[str, str]], SamplingParams, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def resolve_model(self) -> str:
        return self.model_name

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((messages, params, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let the other rows queue their requests
            batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
            try:
                results = await asyncio.to_thread(self._generate, [m for m, _, _ in batch], batch[0][1])
            except Exception as exc:  # a failing generate fails the batch's rows
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(RequestError(f"generate failed: {exc}", retryable=False))
                continue
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _generate(
        self, conversations: list[list[dict[str, str]]], params: SamplingParams
    ) -> list[Completion]:
        import torch

        tok = self.tokenizer
        extra = {} if params.enable_thinking is None else {"enable_thinking": params.enable_thinking}
        texts = [
            tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **extra)
            for m in conversations
        ]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        inputs = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        inputs = inputs.to(self.model.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_tokens, do_sample=sample, pad_token_id=pad_id)
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p or 1.0, top_k=params.top_k or 0)
            if params.min_p:
                kwargs["min_p"] = params.min_p
        if params.repetition_penalty:
            kwargs["repetition_penalty"] = params.repetition_penalty
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        configured = self.model.generation_config.eos_token_id
        eos_ids = {configured} if isinstance(configured, int) else set(configured or [])
        eos_ids.add(tok.eos_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        results = []
        for row, ids in enumerate(out[:, prompt_len:].tolist()):
            stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
            kept = ids if stop is None else ids[:stop]
            results.append(
                Completion(
                    text=tok.decode(kept, skip_special_tokens=True),
                    finish_reason="length" if stop is None else "stop",
                    prompt_tokens=int(inputs["attention_mask"][row].sum()),
                    completion_tokens=len(kept) + (0 if stop is None else 1),
                )
            )
        return results

    async def close(self) -> None:
        return None
