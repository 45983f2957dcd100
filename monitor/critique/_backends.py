"""Critic backends: an OpenAI-compatible chat-completions endpoint (async HTTP) or the in-process model.

Both answer ``chat(messages, max_tokens, top_logprobs)`` with the text and, when asked, the top
log-probabilities of the first generated token (what the fast yes/no mode reads), and
``label_logprobs(messages, labels)``: the log-probability of each candidate label as the next token
(what the debate judge reads; a label the backend did not report is absent, never guessed).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Protocol


class CriticUnavailable(RuntimeError):
    """The critic could not be reached or answered with an error (counted, never guessed around)."""


@dataclass(frozen=True)
class ChatReply:
    text: str
    first_token_logprobs: dict[str, float] = field(default_factory=dict)  # token text -> logprob


class CriticBackend(Protocol):
    name: str

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply: ...

    async def aclose(self) -> None:
        """Release connections (the server calls it once, at shutdown)."""
        ...


class OpenAIChatBackend:
    """Any server speaking ``POST /v1/chat/completions`` (vLLM, TGI, llama.cpp, the reference server)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        import httpx

        self.name = f"openai:{model}@{base_url}"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply:
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        try:
            resp = await self._client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise CriticUnavailable(f"critic {self.name}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise CriticUnavailable(f"critic {self.name}: HTTP {resp.status_code}: {resp.text[:200]}")
        choice = resp.json()["choices"][0]
        first: dict[str, float] = {}
        content = ((choice.get("logprobs") or {}).get("content")) or []
        if content:
            for alt in content[0].get("top_logprobs") or [
                {"token": content[0]["token"], "logprob": content[0]["logprob"]}
            ]:
                first.setdefault(alt["token"], float(alt["logprob"]))
        return ChatReply(choice["message"]["content"] or "", first)

    async def label_logprobs(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        """Log-probability of each label as the first reply token, from the server's ``top_logprobs``
        (20, the OpenAI maximum); tokens equal to a label after stripping spaces are summed; a label
        outside the top 20 is absent."""
        reply = await self.chat(messages, max_tokens=1, top_logprobs=20)
        return _labels_from_top(reply.first_token_logprobs, labels)

    async def aclose(self) -> None:
        await self._client.aclose()


class InProcessBackend:
    """The default model in this process (greedy), run on a worker thread so the event loop stays free."""

    name = "in-process:SmolLM2-135M-Instruct"

    def __init__(self, model: Any = None, tokenizer: Any = None) -> None:
        if model is None:
            from monitor.models import load_default_model

            model, tokenizer = load_default_model()
        self.model, self.tokenizer = model, tokenizer
        self._lock = asyncio.Lock()

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply:
        async with self._lock:
            return await asyncio.to_thread(self._chat, messages, max_tokens, top_logprobs)

    async def label_logprobs(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        """Log-softmax of the next-token logits at each label's token(s) (``"A"`` and ``" A"`` summed):
        one forward pass, every label answered."""
        async with self._lock:
            return await asyncio.to_thread(self._label_logprobs, messages, labels)

    def _label_logprobs(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        import torch

        enc = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            logits = self.model(**enc).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        out: dict[str, float] = {}
        for label in labels:
            ids = {self.tokenizer.encode(v, add_special_tokens=False)[0] for v in (label, " " + label)}
            out[label] = float(torch.logsumexp(lp[sorted(ids)], 0))
        return out

    async def aclose(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def _chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int) -> ChatReply:
        import torch

        enc = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_scores=bool(top_logprobs),
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        ids = out.sequences[0, enc["input_ids"].shape[1] :]
        first: dict[str, float] = {}
        if top_logprobs and out.scores:
            lp = torch.log_softmax(out.scores[0][0].float(), -1)
            vals, idx = lp.topk(top_logprobs)
            for v, i in zip(vals, idx, strict=True):
                first.setdefault(self.tokenizer.decode([int(i)]), float(v))
        return ChatReply(self.tokenizer.decode(ids, skip_special_tokens=True), first)


def _labels_from_top(top: dict[str, float], labels: list[str]) -> dict[str, float]:
    """Sum the probability of the top tokens that spell each label (``"A"``, ``" A"``); absent if none."""
    out: dict[str, float] = {}
    for label in labels:
        ps = [math.exp(v) for k, v in top.items() if k.strip() == label]
        if ps:
            out[label] = math.log(sum(ps))
    return out
