"""Encode only the latents the detectors read, so scoring cost does not grow with d_sae.

ReLU and JumpReLU latents are independent of one another: column j of ``W_enc`` (with
``b_enc[j]``, ``b_dec`` and ``threshold[j]``) is all latent j needs, and the sliced
result equals the full encode on those ids (to float rounding: b_dec is folded into the
bias). TopK latents compete (whether j survives depends on every other pre-activation), so a
TopK slice runs the full encode and then selects: its cost is the full ``d_in x d_sae``
matmul. ``full_encode_required`` says which case applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monitor.sae._base import SAE
from monitor.sae._config import SAEError
from monitor.sae._files import slice_encoder


class SlicedEncoder(torch.nn.Module):
    """Latents ``latent_ids`` of ``sae``: ``encode(x [n, d_in]) -> [n, len(latent_ids)]``.

    >>> import torch
    >>> from monitor.sae import SAE, SAEConfig
    >>> torch.manual_seed(0) and None
    >>> sae = SAE.from_state(SAEConfig(8, 32), {"W_enc": torch.randn(8, 32), "b_enc": torch.randn(32),
    ...                      "W_dec": torch.randn(32, 8), "b_dec": torch.randn(8)})
    >>> x = torch.randn(5, 8)
    >>> bool(torch.allclose(SlicedEncoder(sae, [3, 7, 30]).encode(x), sae.encode(x)[:, [3, 7, 30]], atol=1e-5))
    True
    """

    W: torch.Tensor
    b: torch.Tensor
    threshold: torch.Tensor
    idx: torch.Tensor

    def __init__(self, sae: SAE, latent_ids: Sequence[int]) -> None:
        super().__init__()
        ids = [int(i) for i in latent_ids]
        if not ids:
            raise SAEError("latent_ids: expected at least one latent id, got none")
        bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
        if bad:
            raise SAEError(f"latent_ids: expected ids in 0..{sae.cfg.d_sae - 1}, got {bad[:5]}")
        self.latent_ids = ids
        self.architecture = sae.cfg.architecture
        self.full_encode_required = self.architecture == "topk"
        self._sae = sae if self.full_encode_required else None
        self.register_buffer("idx", torch.tensor(ids))
        if self.full_encode_required:
            for name in ("W", "b", "threshold"):
                self.register_buffer(name, torch.zeros(0))
            return
        # The same slice the server uses (numpy): input scale and b_dec folded into pre = x @ W + b.
        sl = slice_encoder(sae.cfg, {k: v.float().numpy() for k, v in sae.state().items()}, ids)
        self.register_buffer("W", torch.from_numpy(sl.W))
        self.register_buffer("b", torch.from_numpy(sl.b))
        self.register_buffer("threshold", torch.from_numpy(sl.threshold))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the chosen latents ``[n, k]`` (what projected-mode clients send)."""
        return x.to(self.W.dtype) @ self.W + self.b

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent values from the chosen latents' pre-activations (ReLU / JumpReLU)."""
        if self.full_encode_required:
            raise SAEError("projected mode: a topk SAE needs every latent's pre-activation; send raw activations")
        return torch.where(pre > self.threshold, torch.relu(pre), torch.zeros_like(pre))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_encode_required:
            assert self._sae is not None
            return self._sae.encode(x)[..., self.idx]
        return self.activate(self.pre_activations(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def export_onnx(self, path: str | Path) -> Path:
        """Write this slice as an ONNX graph ``x [n, d_in] float32 -> latents [n, k]``."""
        if self.full_encode_required:
            raise SAEError("ONNX export: a topk slice needs the full encoder; export is for relu/jumprelu")
        path = Path(path)
        example = torch.zeros(2, self.W.shape[0])
        torch.onnx.export(
            self,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["latents"],
            dynamic_axes={"x": {0: "tokens"}, "latents": {0: "tokens"}},
            opset_version=17,
            dynamo=False,
        )
        return path


class OnnxSlicedEncoder:
    """An exported slice run by onnxruntime (CPU): ``encode(x: np.ndarray) -> np.ndarray``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def encode(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run(["latents"], {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0])
