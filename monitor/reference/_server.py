"""An OpenAI-compatible chat-completions server for the default model, monitored by the sidecar.

``POST /v1/chat/completions`` (non-streaming JSON, or SSE with ``stream: true``; ``logprobs`` and
``top_logprobs`` when asked), ``GET /v1/models``, ``GET /health``. Every generation streams its
residual stream to the sidecar through ``GenerationMonitor``; when the sidecar advises HALT and
``halt_on_advice`` is on, generation stops and the finish reason is ``content_filter`` with the
reason in ``safety_monitor.halt_reason``. Built on the standard library's HTTP server: it is a
reference for integrators and the demo's backend, not a production inference server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from monitor.client import GenerationMonitor, MonitoredGeneration

log = logging.getLogger("monitor.reference")
MAX_TOKENS_LIMIT = 2048


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and an OpenAI-style error naming the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """The parameters of one chat completion this server supports."""

    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.0
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def parse(cls, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestError("body", "expected a JSON object")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("messages", "expected a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role", "expected one of system, user, assistant")
            if not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}].content", "expected a string")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 128))
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise RequestError("max_tokens", f"expected an integer in 1..{MAX_TOKENS_LIMIT}, got {max_tokens!r}")
        temperature = body.get("temperature", 0.0)
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise RequestError("temperature", f"expected a number in 0..2, got {temperature!r}")
        top = body.get("top_logprobs", 0) or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            raise RequestError("top_logprobs", f"expected an integer in 0..20, got {top!r}")
        return cls(
            messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
            max_tokens=max_tokens,
            temperature=float(temperature),
            stream=bool(body.get("stream", False)),
            logprobs=bool(body.get("logprobs", False)) or top > 0,
            top_logprobs=top,
        )


class ReferenceServer:
    """Serves the model over HTTP on ``host:port``; ``start()`` runs it on a background thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        monitor: GenerationMonitor | None,
        host: str = "127.0.0.1",
        port: int = 8000,
    ) -> None:
        self.model, self.tokenizer, self.model_id, self.monitor = model, tokenizer, model_id, monitor
        self._lock = threading.Lock()  # one generation at a time: the CPU is the bottleneck anyway
        server = self

        class Handler(_Handler):
            app = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ReferenceServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="reference-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- generation ---------------------------------------------------------------------------
    def complete(
        self, req: ChatRequest, request_id: str, on_token: Any = None, traceparent: str = ""
    ) -> dict[str, Any]:
        """Run one chat completion; ``on_token(text)`` receives text deltas as they are generated.
        ``traceparent``: the request's W3C trace context header, passed on to the sidecar."""
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_text = req.messages[-1]["content"]
        kwargs: dict[str, Any] = {
            "attention_mask": enc["attention_mask"],
            "max_new_tokens": req.max_tokens,
            "do_sample": req.temperature > 0,
            "return_dict_in_generate": True,
            "output_scores": req.logprobs,
            "pad_token_id": self.tokenizer.eos_token_id,
        }
        if req.temperature > 0:
            kwargs["temperature"] = req.temperature
        streamer = None
        if on_token is not None:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs["streamer"] = streamer
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    if self.monitor is not None:
                        result["gen"] = self.monitor.generate(
                            request_id, enc["input_ids"], prompt=prompt_text, traceparent=traceparent, **kwargs
                        )
                    else:
                        result["out"] = self.model.generate(enc["input_ids"], **kwargs)
            except BaseException as exc:  # surfaced to the HTTP handler below
                result["error"] = exc
                if streamer is not None:
                    streamer.end()

        with self._lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            if streamer is not None:
                for piece in streamer:
                    if piece:
                        on_token(piece)
            worker.join()
        if "error" in result:
            raise result["error"]
        gen: MonitoredGeneration | None = result.get("gen")
        out = gen.output if gen is not None else result["out"]
        new = out.sequences[0, enc["input_ids"].shape[1] :]
        ids = [int(t) for t in new]
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        ended = bool(ids) and ids[-1] in stop_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        halted = gen is not None and gen.halted
        finish = "content_filter" if halted else ("stop" if ended else "length")
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": int(enc["input_ids"].shape[1]),
            "completion_tokens": len(ids),
            "logprobs": self._logprobs(out, ids, req.top_logprobs) if req.logprobs else None,
            "safety_monitor": {
                "request_id": request_id,
                "halted": halted,
                "halt_reason": gen.halt_reason if gen is not None else "",
                "error": gen.error if gen is not None else "monitoring off",
            },
        }

    def _logprobs(self, out: Any, ids: list[int], top: int) -> dict[str, Any]:
        import torch

        content = []
        for step, tok in enumerate(ids[: len(out.scores)]):
            lp = torch.log_softmax(out.scores[step][0].float(), dim=-1)
            entry: dict[str, Any] = {"token": self.tokenizer.decode([tok]), "logprob": float(lp[tok])}
            if top:
                vals, idx = lp.topk(top)
                entry["top_logprobs"] = [
                    {"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                    for v, i in zip(vals, idx, strict=True)
                ]
            content.append(entry)
        return {"content": content}


class _Handler(BaseHTTPRequestHandler):
    app: ReferenceServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        err_type = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": err_type, "param": param, "code": None}})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.app.model_id, "object": "model"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
            req = ChatRequest.parse(body)
        except json.JSONDecodeError as exc:
            self._error(400, f"body: expected JSON: {exc}", "body")
            return
        except RequestError as exc:
            self._error(400, str(exc), exc.param)
            return
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        traceparent = self.headers.get("traceparent", "")  # W3C trace context: on to the sidecar as is
        try:
            if req.stream:
                self._stream(req, request_id, traceparent)
            else:
                r = self.app.complete(req, request_id, traceparent=traceparent)
                self._json(200, _completion(self.app.model_id, request_id, r))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            log.exception("generation failed")
            self._error(500, f"generation failed: {exc}")

    def _stream(self, req: ChatRequest, request_id: str, traceparent: str = "") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        created = int(time.time())

        def send(doc: dict[str, Any] | str) -> None:
            data = doc if isinstance(doc, str) else json.dumps(doc)
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):X}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

        def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> None:
            doc: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.app.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            send({**doc, **(extra or {})})

        chunk({"role": "assistant", "content": ""})
        r = self.app.complete(req, request_id, on_token=lambda text: chunk({"content": text}), traceparent=traceparent)
        chunk({}, r["finish_reason"], {"safety_monitor": r["safety_monitor"]})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _completion(model_id: str, request_id: str, r: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": r["text"]},
        "finish_reason": r["finish_reason"],
        "logprobs": r["logprobs"],
    }
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": {
            "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"],
            "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
        },
        "safety_monitor": r["safety_monitor"],
    }


def iter_sse(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Parse an SSE response body (as the OpenAI client does): the JSON of each ``data:`` event."""
    for raw in lines:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
