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
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from deepspec.errors import DataError


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


def parse_address(address: str) -> str:
    """``HOST:PORT`` or a URL → the API base URL ending in ``/v1``."""
    address = address.strip().rstrip("/")
    if not address:
        raise DataError("empty --server-address")
    if "://" not in address:
        address = "http://" + address
    return address if address.endswith("/v1") else address + "/v1"


class OpenAIBackend:
    """Chat completions through the ``openai`` client, spread over several servers."""

    def __init__(self, addresses: list[str], model: str | None, *, timeout: float) -> None:
        import openai

        if not addresses:
            raise DataError("no --server-address given")
        self.urls = [parse_address(a) for a in addresses]
        self.model = model
        self.timeout = timeout
        api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.clients = [
            openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout)
            for url in self.urls
        ]
        self.in_flight = [0] * len(self.clients)
        self._tie = itertools.count()

    async def resolve_model(self) -> str:
        """The ``--model`` name, or the first model the first reachable server lists."""
        if self.model:
            return self.model
        problems = []
        for url, client in zip(self.urls, self.clients):
            try:
                models = await client.models.list()
                if models.data:
                    self.model = models.data[0].id
                    return self.model
                problems.append(f"{url}: no models")
            except Exception as exc:  # any failure: try the next server
                problems.append(f"{url}: {type(exc).__name__}")
        raise DataError("cannot ask the servers for a model name (" + "; ".join(problems) + "); pass --model")

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
                model=self.model or "default", messages=messages, **params.openai_kwargs()
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

        from deepspec.targets.resolve import resolve_target

        model_dir = resolve_target(target)
        self.model_name = target
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
