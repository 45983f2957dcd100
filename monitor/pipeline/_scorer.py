"""Scoring a generation: ``Pipeline.score`` for a finished one, ``StreamScorer.update`` per chunk of a
running one. Both fold activations through ``Evidence`` and validate through ``_validate``; this
module only sequences them and builds the result objects.
"""

from __future__ import annotations

import time

from monitor.detectors import Bundle, DetectorSet
from monitor.errors import InvalidInput
from monitor.pipeline._evidence import Evidence
from monitor.pipeline._halt import halt_reason
from monitor.pipeline._types import ChunkInput, Limits, ScoreInput, ScoreResult, StreamVerdict
from monitor.pipeline._validate import MAX_TEXT_CHARS, check_identity, check_text
from monitor.text import text_statistics

__all__ = ["Pipeline", "StreamScorer"]


class Pipeline:
    """Scores generations against a loaded bundle.

    >>> from monitor.detectors import Bundle
    >>> from monitor.pipeline import ActivationInput
    >>> from monitor.tensors import encode
    >>> import numpy as np
    >>> p = Pipeline(Bundle.load())
    >>> x = np.full((4, 576), 0.5, dtype=np.float32)
    >>> r = p.score(ScoreInput("r1", "SmolLM2-135M-Instruct", output="Hi there.",
    ...     activations=[ActivationInput("blocks.16.hook_resid_post", encode(x))]))
    >>> r.hook_stats[0].tokens, round(r.hook_stats[0].mean_l2_norm, 3)
    (4, 12.0)
    """

    def __init__(
        self,
        bundle: Bundle,
        limits: Limits | None = None,
        detectors: DetectorSet | None = None,
    ) -> None:
        self.bundle = bundle
        self.limits = limits or Limits()
        self.detectors = detectors if detectors is not None else DetectorSet.from_bundle(bundle)

    def score(self, req: ScoreInput) -> ScoreResult:
        """Validate and score one finished generation; raises ``InvalidInput`` on bad fields."""
        start = time.perf_counter()
        check_identity(req.request_id, req.model, req.labels, self.bundle)
        check_text("prompt", req.prompt)
        check_text("output", req.output)
        if not req.activations:
            raise InvalidInput(
                "activations",
                f"at least one block for hook point {self.bundle.hook_points[0].name}",
                "none",
                reason="missing",
            )
        evidence = self.evidence("request")
        _, nbytes = evidence.fold(req.activations)
        nbytes += evidence.fold_decision(req.decision)
        results = evidence.results()
        return ScoreResult(
            request_id=req.request_id,
            model=req.model,
            hook_stats=evidence.hook_stats(),
            text_stats=text_statistics(req.prompt, req.output),
            flagged=any(r.fired for r in results),
            seconds=time.perf_counter() - start,
            bytes_received=nbytes,
            detectors=results,
        )

    def open_stream(self) -> StreamScorer:
        """State for one ScoreStream call; feed it chunks with ``update``."""
        return StreamScorer(self)

    def evidence(self, scope: str, max_tokens_total: int | None = None) -> Evidence:
        """Empty evidence for one generation, against this pipeline's bundle, detectors and limits."""
        return Evidence(self.bundle, self.detectors, self.limits, scope, max_tokens_total)


class StreamScorer:
    """Running state of one ScoreStream: bounded accumulators, one verdict per chunk."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._bundle = pipeline.bundle
        self._evidence = pipeline.evidence("chunk", pipeline.limits.max_stream_tokens)
        self.request_id = ""
        self.model = ""
        self.chunks = 0
        self.finished = False
        self.halted = ""
        self._prompt = ""
        self._output_parts: list[str] = []
        self._output_chars = 0

    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def output(self) -> str:
        """The output text received so far."""
        return "".join(self._output_parts)

    @property
    def tokens_seen(self) -> int:
        return self._evidence.tokens_seen

    def update(self, chunk: ChunkInput) -> StreamVerdict:
        """Validate and fold in one chunk; raises ``InvalidInput`` (the stream should end)."""
        start = time.perf_counter()
        if self.finished:
            raise InvalidInput("final", "no chunks after a chunk with final=true", "another chunk")
        if self.chunks == 0:
            check_identity(chunk.request_id, chunk.model, chunk.labels, self._bundle)
            check_text("prompt", chunk.prompt)
            self.request_id, self.model, self._prompt = chunk.request_id, chunk.model, chunk.prompt
        elif chunk.request_id and chunk.request_id != self.request_id:
            raise InvalidInput(
                "request_id", f"{self.request_id!r} (as in the stream's first chunk)", repr(chunk.request_id)
            )
        self._output_chars += len(chunk.text_delta)
        if self._output_chars > MAX_TEXT_CHARS:
            raise InvalidInput("text_delta", f"at most {MAX_TEXT_CHARS} characters in all", str(self._output_chars))
        new_tokens, nbytes = self._evidence.fold(chunk.activations)
        nbytes += self._evidence.fold_decision(chunk.decision)
        self._output_parts.append(chunk.text_delta)
        index = self.chunks
        self.chunks += 1
        self.finished = chunk.final
        if chunk.final and self.tokens_seen == 0 and not self._evidence.has_decision:
            # A decision row alone is enough: a 1-token answer has no response row (its only token
            # is never fed back through the model), and the prompt detectors still read the decision.
            raise InvalidInput(
                "activations",
                "at least one activation or decision row over the stream (a stream without either scores nothing)",
                "none by the final chunk",
                reason="missing",
            )
        results = self._evidence.results()
        if chunk.final:  # full statistics once, on the whole output; chunks get the cheap ones
            output = self.output
            self._output_parts = [output]
            stats = text_statistics(self._prompt, output)
        else:
            stats = {"output_chars": float(self._output_chars), "prompt_chars": float(len(self._prompt))}
        halted_now = False
        if not self.halted:
            self.halted = halt_reason(results)
            halted_now = bool(self.halted)
        return StreamVerdict(
            request_id=self.request_id,
            model=self.model,
            chunk_index=index,
            tokens_seen=self.tokens_seen,
            new_tokens=new_tokens,
            new_bytes=nbytes,
            hook_stats=self._evidence.hook_stats(),
            text_stats=stats,
            halt=bool(self.halted),
            reason=self.halted,
            final=chunk.final,
            seconds=time.perf_counter() - start,
            detectors=results,
            halted_now=halted_now,
        )
