"""Monitor a transformers causal LM's ``generate()`` with the sidecar, in a few lines.

Forward hooks capture the residual stream at the bundle's hook points for every generated token
(decode steps), and from the prompt's prefill only the last position, the *decision position*
(last prompt-template token) that prompt detectors such as harmfulness read; it travels in the
first chunk's ``decision`` field. Chunks of ``chunk_tokens`` rows go to the sidecar's ``ScoreStream`` from a background
thread, so generation never waits for the network. A stopping criterion reads the latest
verdict and ends generation when the sidecar advises HALT (at most one chunk late).

    monitor = GenerationMonitor(model, client, model_id=catalog.model, hook_points=[hook])
    out = monitor.generate("req-1", input_ids, prompt=prompt_text, max_new_tokens=64)
    out.sequences, out.halted          # as soon as generate() returns
    out.verdict()                      # the sidecar's final verdict (waits for it)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.architectures import check_hook_points, decoder_layers
from monitor.client._errors import ClientError
from monitor.client._sync import MonitorClient
from monitor.client._types import ChunkVerdict, EncoderSlice

_END = object()


@dataclass
class _Chunk:
    activations: dict[str, Any]
    text: str = ""
    final: bool = False
    projected: bool = False
    decision: dict[str, Any] = field(default_factory=dict)


@dataclass
class MonitoredGeneration:
    """What ``GenerationMonitor.generate`` returns: the model's output plus the monitoring outcome."""

    request_id: str
    sequences: Any  # generate()'s sequences (or its whole output when return_dict_in_generate=True)
    output: Any
    halted: bool
    halt_reason: str
    _session: _Session = field(repr=False)

    def verdict(self, timeout: float | None = 30.0) -> ChunkVerdict | None:
        """The sidecar's verdict on the whole generation (None if the sidecar could not be reached)."""
        return self._session.wait(timeout)

    @property
    def error(self) -> str:
        """Why monitoring failed for this generation ('' when it did not)."""
        return self._session.error


class _Session:
    """One generation's stream: a sender thread, the HALT flag, the final verdict."""

    def __init__(
        self,
        client: MonitorClient,
        request_id: str,
        model_id: str,
        prompt: str,
        labels: dict[str, str],
        traceparent: str = "",
    ):
        self.halt = threading.Event()
        self.reason = ""
        self.error = ""
        self.last: ChunkVerdict | None = None
        self._done = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._args = (client, request_id, model_id, prompt, labels, traceparent)
        self._thread = threading.Thread(target=self._run, name=f"monitor-{request_id}", daemon=True)
        self._thread.start()

    def put(self, chunk: _Chunk | object) -> None:
        """Queue a chunk (or ``_END`` to close the stream without a final chunk)."""
        self._queue.put(chunk)

    def _run(self) -> None:
        client, request_id, model_id, prompt, labels, traceparent = self._args
        try:
            with client.stream(request_id, model_id, prompt=prompt, labels=labels, traceparent=traceparent) as stream:
                while True:
                    item = self._queue.get()
                    if item is _END:
                        break
                    verdict = stream.send(
                        item.activations, item.text, final=item.final, projected=item.projected, decision=item.decision
                    )
                    self.last = verdict
                    if verdict.halt and not self.halt.is_set():
                        self.reason = verdict.reason
                        self.halt.set()
                    if item.final:
                        break
        except ClientError as exc:  # the sidecar being down must never break generation
            self.error = str(exc)
        finally:
            self._done.set()

    def wait(self, timeout: float | None) -> ChunkVerdict | None:
        self._done.wait(timeout)
        return self.last if self._done.is_set() and not self.error else None


class GenerationMonitor:
    """Streams a transformers model's residual stream to the sidecar while it generates.

    model: a transformers causal LM of a family in ``monitor.architectures`` (Llama, Mistral,
        Qwen2, Qwen3, Gemma2, Gemma3 text); its decoder layers are found by family.
    hook_points: ``blocks.L.hook_resid_post`` names (the catalog's hook points).
    encoder_slices: optional hook point -> ``EncoderSlice`` from the catalog. When given, the
        projection runs on the model's device and K values per token are shipped (projected mode).
    chunk_tokens: tokens per ScoreStream chunk.
    halt_on_advice: stop generating when the sidecar advises HALT.
    """

    def __init__(
        self,
        model: Any,
        client: MonitorClient,
        *,
        model_id: str,
        hook_points: Sequence[str] = ("blocks.16.hook_resid_post",),
        encoder_slices: Mapping[str, EncoderSlice] | None = None,
        tokenizer: Any = None,
        chunk_tokens: int = 16,
        halt_on_advice: bool = True,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: expected >= 1, got {chunk_tokens}")
        self.model = model
        self.client = client
        self.model_id = model_id
        self.hook_points = list(hook_points)
        self.layers = dict(zip(self.hook_points, check_hook_points(model.config, self.hook_points), strict=True))
        self._blocks = decoder_layers(model)
        self.encoder_slices = dict(encoder_slices or {})
        if self.encoder_slices and set(self.encoder_slices) != set(self.hook_points):
            raise ValueError("encoder_slices: expected one slice per hook point (projected mode covers all of them)")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.halt_on_advice = halt_on_advice

    def generate(
        self,
        request_id: str,
        input_ids: Any,
        *,
        prompt: str = "",
        labels: Mapping[str, str] | None = None,
        traceparent: str = "",
        **generate_kwargs: Any,
    ) -> MonitoredGeneration:
        """``model.generate(input_ids, **generate_kwargs)``, monitored. Batch size 1.

        ``traceparent``: the W3C trace context of the request being served (its incoming header):
        the sidecar's evaluation events and exemplars for this generation carry that trace.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected batch size 1, got {input_ids.shape[0]}")
        session = _Session(self.client, request_id, self.model_id, prompt, dict(labels or {}), traceparent)
        pending: dict[str, list[Any]] = {hp: [] for hp in self.hook_points}
        calls = {hp: 0 for hp in self.hook_points}
        decision: dict[str, Any] = {}  # sent once, with the first chunk

        def flush(final: bool, text: str = "") -> None:
            acts: dict[str, Any] = {}
            for hp, rows in pending.items():
                if rows:
                    acts[hp] = torch.cat(rows)
                    rows.clear()
            if acts or final:
                session.put(_Chunk(acts, text, final, projected=bool(self.encoder_slices), decision=dict(decision)))
                decision.clear()

        def make_hook(hp: str) -> Any:
            sl = self.encoder_slices.get(hp)

            def hook(module: Any, inputs: Any, output: Any) -> None:
                calls[hp] += 1
                hidden = (output[0] if isinstance(output, tuple) else output)[0, -1:, :].detach()
                row = sl.project(hidden) if sl is not None else hidden
                if calls[hp] == 1:  # prefill: only the decision position is monitored
                    decision[hp] = row.float().cpu()
                    return
                pending[hp].append(row.float().cpu())
                if hp == self.hook_points[0] and len(pending[hp]) >= self.chunk_tokens:
                    flush(final=False)

            return hook

        class _Halt(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((ids.shape[0],), session.halt.is_set(), dtype=torch.bool, device=ids.device)

        criteria = list(generate_kwargs.pop("stopping_criteria", None) or [])
        if self.halt_on_advice:
            criteria.append(_Halt())
        handles = [self._blocks[self.layers[hp]].register_forward_hook(make_hook(hp)) for hp in self.hook_points]
        try:
            out = self.model.generate(input_ids, stopping_criteria=StoppingCriteriaList(criteria), **generate_kwargs)
        except BaseException:
            session.put(_END)
            raise
        finally:
            for h in handles:
                h.remove()
        sequences = out.sequences if hasattr(out, "sequences") else out
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
        flush(final=True, text=text)
        halted = session.halt.is_set()
        return MonitoredGeneration(request_id, sequences, out, halted, session.reason, session)
