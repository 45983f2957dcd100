"""SAE architectures and file formats against an independent numpy reference and files the real libraries wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file

from monitor.sae import SAE, OnnxSlicedEncoder, SAEConfig, SAEError, SlicedEncoder, load, save, save_saelens

D_IN, D_SAE = 16, 64
rng = np.random.default_rng(0)


def weights(arch: str) -> dict[str, np.ndarray]:
    w = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
        "b_enc": rng.normal(size=D_SAE).astype(np.float32) * 0.1,
        "W_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32),
        "b_dec": rng.normal(size=D_IN).astype(np.float32),
    }
    if arch == "jumprelu":
        w["threshold"] = np.abs(rng.normal(size=D_SAE)).astype(np.float32)
    return w


def reference_encode(
    w: dict[str, np.ndarray], x: np.ndarray, arch: str, *, apply_b_dec: bool = True, scale: float = 1.0, k: int = 4
) -> np.ndarray:
    """Written from the papers' definitions, independently of monitor.sae."""
    xin = x * scale - (w["b_dec"] if apply_b_dec else 0.0)
    pre = xin @ w["W_enc"] + w["b_enc"]
    if arch == "relu":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, top] = np.maximum(pre[rows, top], 0)
    return out


def make(arch: str, **cfg: object) -> tuple[SAE, dict[str, np.ndarray]]:
    w = weights(arch)
    c = SAEConfig(D_IN, D_SAE, architecture=arch, k=4 if arch == "topk" else None, **cfg)  # type: ignore[arg-type]
    return SAE.from_state(c, {k: torch.from_numpy(v) for k, v in w.items()}), w


X = rng.normal(size=(10, D_IN)).astype(np.float32)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_encode_matches_reference_and_native_round_trip(arch: str, tmp_path: Path) -> None:
    sae, w = make(arch, hook_point="blocks.3.hook_resid_post", model_id="m")
    z = sae.encode(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(z, reference_encode(w, X, arch), rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert ((z > 0).sum(axis=1) <= 4).all()
    loaded = load(save(sae, tmp_path / "native"))
    assert loaded.cfg == sae.cfg and type(loaded) is type(sae)
    assert torch.equal(loaded.encode(torch.from_numpy(X)), sae.encode(torch.from_numpy(X)))


def test_native_fp16_storage_halves_size(tmp_path: Path) -> None:
    sae, _ = make("relu", dtype="float16")
    folder = save(sae, tmp_path / "h")
    sae32, _ = make("relu")
    folder32 = save(sae32, tmp_path / "f")
    ratio = (folder / "sae.safetensors").stat().st_size / (folder32 / "sae.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    z = load(folder).encode(torch.from_numpy(X)).numpy()
    assert np.abs(z - sae.encode(torch.from_numpy(X)).numpy()).max() < 0.05 * np.abs(z).max()


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_saelens_round_trip(arch: str, tmp_path: Path) -> None:
    sae, w = make(arch)
    loaded = load(save_saelens(sae, tmp_path / "sl"))
    assert loaded.cfg.architecture == arch
    np.testing.assert_allclose(loaded.encode(torch.from_numpy(X)).numpy(), reference_encode(w, X, arch), atol=1e-5)


def test_saelens_log_threshold_and_expected_average_scaling(tmp_path: Path) -> None:
    w = weights("jumprelu")
    state = {k: v for k, v in w.items() if k != "threshold"}
    state["log_threshold"] = np.log(w["threshold"])
    folder = tmp_path / "sl"
    folder.mkdir()
    np_save_file(state, str(folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "hook_name": "blocks.5.hook_resid_post",
        "model_name": "gpt2",
        "apply_b_dec_to_input": True,
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": 0.25,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load(folder)
    assert sae.cfg.normalize_activations == "none"  # the factor was folded into the weights
    assert sae.cfg.hook_point == "blocks.5.hook_resid_post"
    ref = reference_encode(w, X, "jumprelu", scale=0.25)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), ref, rtol=1e-4, atol=1e-5)
    # Reconstruction comes back in the raw activations' scale.
    z = torch.from_numpy(ref)
    expected = (ref @ w["W_dec"] + w["b_dec"]) / 0.25
    np.testing.assert_allclose(sae.decode(z).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_gemma_scope_npz_and_cross_format_equality(tmp_path: Path) -> None:
    w = weights("jumprelu")
    np.savez(tmp_path / "params.npz", **w)
    gemma = load(tmp_path / "params.npz")
    assert gemma.cfg.architecture == "jumprelu" and not gemma.cfg.apply_b_dec_to_input
    ref = reference_encode(w, X, "jumprelu", apply_b_dec=False)
    z_gemma = gemma.encode(torch.from_numpy(X))
    np.testing.assert_allclose(z_gemma.numpy(), ref, rtol=1e-5, atol=1e-5)
    z_native = load(save(gemma, tmp_path / "native")).encode(torch.from_numpy(X))
    z_saelens = load(save_saelens(gemma, tmp_path / "saelens")).encode(torch.from_numpy(X))
    assert torch.equal(z_gemma, z_native) and torch.equal(z_gemma, z_saelens)


def test_bad_files_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match=r"expected a folder with sae\.json"):
        load(tmp_path)
    np.savez(tmp_path / "p.npz", W_enc=np.zeros((2, 3)))
    with pytest.raises(SAEError, match=r"missing \['W_dec', 'b_dec', 'b_enc', 'threshold'\]"):
        load(tmp_path / "p.npz")
    with pytest.raises(SAEError, match=r"weights\['W_enc'\]: expected shape \[16, 64\], got \[16, 63\]"):
        SAE.from_state(SAEConfig(D_IN, D_SAE), {"W_enc": torch.zeros(16, 63)})
    with pytest.raises(SAEError, match=r"architecture: expected one of relu, jumprelu, topk, got 'gated'"):
        SAEConfig(4, 8, architecture="gated")


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_sliced_encoder_equals_full_on_its_ids_torch_and_onnx(arch: str, tmp_path: Path) -> None:
    sae, _ = make(arch, normalize_activations="expected_average_only_in", norm_scaling_factor=0.5)
    ids = [0, 5, 17, 63, 40]
    sliced = SlicedEncoder(sae, ids)
    x = torch.from_numpy(X)
    full = sae.encode(x)[:, ids]
    assert not sliced.full_encode_required
    torch.testing.assert_close(sliced.encode(x), full, rtol=1e-5, atol=1e-5)
    onnx = OnnxSlicedEncoder(sliced.export_onnx(tmp_path / "slice.onnx"))
    np.testing.assert_allclose(onnx.encode(X), full.numpy(), rtol=1e-5, atol=1e-5)
    # Projected mode: a client sends pre-activations, the sidecar applies the activation.
    torch.testing.assert_close(sliced.activate(sliced.pre_activations(x)), full, rtol=1e-5, atol=1e-5)


def test_topk_slice_runs_the_full_encode(tmp_path: Path) -> None:
    sae, _ = make("topk")
    sliced = SlicedEncoder(sae, [1, 2, 3])
    assert sliced.full_encode_required
    x = torch.from_numpy(X)
    assert torch.equal(sliced.encode(x), sae.encode(x)[:, [1, 2, 3]])
    with pytest.raises(SAEError, match="topk"):
        sliced.export_onnx(tmp_path / "x.onnx")


SAELENS_FILES = Path(__file__).resolve().parents[1] / "data" / "saelens"


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_files_written_by_the_real_saelens_encode_as_saelens_does(arch: str) -> None:
    """Folders written by sae-lens 6 itself (scripts/saelens_fixtures.py), with its own encode of x."""
    from safetensors.numpy import load_file as np_load_file

    from monitor.sae import read, slice_encoder

    folder = SAELENS_FILES / arch
    check = np_load_file(str(folder / "check.safetensors"))
    sae = load(folder)
    assert (sae.cfg.hook_point, sae.cfg.model_id) == ("blocks.3.hook_resid_post", "tiny-model")  # from metadata
    assert sae.cfg.architecture == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert sae.cfg.apply_b_dec_to_input == (arch != "jumprelu")
    got = sae.encode(torch.from_numpy(check["x"])).numpy()
    assert (got > 0).sum() == (check["latents"] > 0).sum() > 0
    assert np.allclose(got, check["latents"], atol=1e-5)
    if arch != "topk":  # what serving uses: the numpy slice of the same files
        cfg, state = read(folder)
        ids = [1, 5, 9, 15]
        assert np.allclose(slice_encoder(cfg, state, ids).encode(check["x"]), check["latents"][:, ids], atol=1e-5)


DATA = Path(__file__).resolve().parents[1] / "data"
SPARSIFY_FILES = DATA / "sparsify"


def _check(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file as np_load_file

    return np_load_file(str(folder / "check.safetensors"))


@pytest.mark.parametrize("name", ["topk", "expansion", "bf16"])
def test_files_written_by_the_real_sparsify_encode_as_sparsify_does(name: str) -> None:
    """Folders written by eai-sparsify itself (scripts/sparsify_fixtures.py), with its own dense encode of x."""
    folder = SPARSIFY_FILES / name / "layers.3"
    check = _check(folder)
    sae = load(folder)
    c = sae.cfg
    assert (c.architecture, c.d_in, c.d_sae, c.k, c.apply_b_dec_to_input) == ("topk", 8, 16, 4, True)
    assert c.hook_point == "blocks.3.hook_resid_post"  # sparsify's hook point "layers.3" is the folder name
    assert c.dtype == ("bfloat16" if name == "bf16" else "float32")
    got = sae.encode(torch.from_numpy(check["x"])).numpy()
    assert (got > 0).sum() == (check["latents"] > 0).sum() > 0
    np.testing.assert_allclose(got, check["latents"], rtol=1e-5, atol=1e-5)
    if name == "topk":  # some tokens have fewer than k positive latents: ReLU-before-top-k agrees
        assert ((check["latents"] > 0).sum(axis=1) < 4).any()
    # Named loader, and a different folder name: no hook point guessed, the argument wins.
    from monitor.sae import from_sparsify

    assert from_sparsify(folder, hook_point="blocks.9.hook_resid_post").cfg.hook_point == "blocks.9.hook_resid_post"


def _sparsify_copy(tmp_path: Path, name: str = "custom") -> Path:
    import shutil

    folder = tmp_path / name
    shutil.copytree(SPARSIFY_FILES / "topk" / "layers.3", folder)
    return folder


def _edit_cfg(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def test_sparsify_unsupported_options_and_bad_files_name_the_field(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as np_load_file

    folder = _sparsify_copy(tmp_path)
    assert load(folder).cfg.hook_point == ""  # not a layers.N folder
    _edit_cfg(folder, skip_connection=True)
    with pytest.raises(SAEError, match=r"skip_connection: a skip connection \(W_skip\) is not supported"):
        load(folder)
    _edit_cfg(folder, skip_connection=False, transcode=True)
    with pytest.raises(SAEError, match=r"transcode: a transcoder is not supported"):
        load(folder)
    _edit_cfg(folder, transcode=False, activation="groupmax")
    with pytest.raises(SAEError, match=r"activation: only 'topk' is supported, got 'groupmax'"):
        load(folder)
    _edit_cfg(folder, activation="topk", d_in=9)
    with pytest.raises(SAEError, match=r"encoder\.weight has shape \[16, 8\], but cfg\.json gives d_in=9"):
        load(folder)
    _edit_cfg(folder, d_in=8)
    state = np_load_file(str(folder / "sae.safetensors"))
    np_save_file({k: v for k, v in state.items() if k != "W_dec"}, str(folder / "sae.safetensors"))
    with pytest.raises(SAEError, match=r"sae\.safetensors: missing \['W_dec'\]"):
        load(folder)


GEMMA_FILES = DATA / "gemma_scope"


def test_gemma_scope_npz_encodes_as_saelens_gemma_scope_loader_does() -> None:
    """params.npz and SAELens's encode through its own Gemma Scope loader (scripts/gemma_scope_fixtures.py)."""
    from monitor.sae import read, slice_encoder

    check = _check(GEMMA_FILES)
    for path in (GEMMA_FILES / "params.npz", GEMMA_FILES):
        sae = load(path)
        assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("jumprelu", False)
        got = sae.encode(torch.from_numpy(check["x"])).numpy()
        assert (got > 0).sum() == (check["latents"] > 0).sum() > 0
        np.testing.assert_allclose(got, check["latents"], rtol=1e-5, atol=1e-5)
    # The thresholds matter here: some latents are positive but below their threshold.
    with np.load(GEMMA_FILES / "params.npz") as params:
        pre = check["x"] @ params["W_enc"] + params["b_enc"]
        assert ((pre > 0) & (pre <= params["threshold"])).any()
    cfg, state = read(GEMMA_FILES / "params.npz")  # what serving uses: the numpy slice
    ids = [0, 3, 7, 15]
    np.testing.assert_allclose(slice_encoder(cfg, state, ids).encode(check["x"]), check["latents"][:, ids], atol=1e-5)
