"""Loading ``bundle.yaml``: the contract between a trained detector set and the server."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor._yaml import YamlError, load_yaml
from monitor.errors import MonitorError, echo

SUPPORTED_FORMAT = 1


class BundleError(MonitorError):
    """A bundle folder is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class HookPoint:
    """One place in the model the bundle reads activations from.

    name: hook point name as clients send it (SAELens style, e.g. ``blocks.16.hook_resid_post``).
    layer: index of the decoder layer whose output (residual stream) this is.
    d_model: width of the activation vectors, in elements.
    """

    name: str
    layer: int
    d_model: int

    def __post_init__(self) -> None:
        if self.d_model <= 0:
            raise BundleError(f"hook point {self.name!r}: d_model must be > 0, got {self.d_model}")


@dataclass(frozen=True)
class Bundle:
    """A detector bundle loaded from a folder with ``bundle.yaml``."""

    name: str
    version: str
    model: str
    hook_points: tuple[HookPoint, ...]
    model_aliases: tuple[str, ...] = ()
    sae_path: Path | None = None
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    identity: str = ""  # sha256 (first 16 hex) of the manifest and weight files: see ``bundle_identity``

    @property
    def accepted_models(self) -> tuple[str, ...]:
        """Model ids a request may name: the bundle's model and its aliases."""
        return (self.model, *self.model_aliases)

    def hook_point(self, name: str) -> HookPoint | None:
        """The hook point called ``name``, or None."""
        for hp in self.hook_points:
            if hp.name == name:
                return hp
        return None

    @classmethod
    def load(cls, path: str | Path | None = None) -> Bundle:
        """Load the bundle in folder ``path`` (the embedded default when None)."""
        folder = Path(path) if path is not None else default_bundle_path()
        manifest = folder / "bundle.yaml"
        if not manifest.is_file():
            raise BundleError(f"bundle: expected a folder with bundle.yaml, got {folder}")
        try:
            raw = load_yaml(manifest.read_text(encoding="utf-8"))
        except OSError as exc:
            raise BundleError(f"{manifest}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise BundleError(f"{manifest}: expected UTF-8 text: {exc.reason} at byte {exc.start}") from None
        except YamlError as exc:
            raise BundleError(f"{manifest}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{manifest}: expected a mapping of keys, got {type(raw).__name__} {echo(raw)}")
        fmt = raw.get("format_version")
        if fmt != SUPPORTED_FORMAT:
            raise BundleError(f"{manifest}: format_version: expected {SUPPORTED_FORMAT}, got {echo(fmt)}")
        try:
            hooks = tuple(
                HookPoint(name=str(h["name"]), layer=int(h["layer"]), d_model=int(h["d_model"]))
                for h in raw["hook_points"]
            )
            bundle = cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                model=str(raw["model"]),
                model_aliases=tuple(str(a) for a in raw.get("model_aliases", [])),
                hook_points=hooks,
                sae_path=folder / str(raw["sae"]["path"]) if raw.get("sae") else None,
                path=folder,
                raw=raw,
                identity=bundle_identity(folder),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest}: missing or malformed key: {echo(str(exc), 300)}") from None
        if not hooks:
            raise BundleError(f"{manifest}: hook_points: expected at least one, got none")
        if bundle.sae_path is not None and not bundle.sae_path.exists():
            raise BundleError(f"{manifest}: sae.path: expected an SAE folder at {bundle.sae_path}, found nothing")
        return bundle

    def load_sae(self) -> Any:
        """The bundle's SAE (``monitor.sae.SAE``), or None when the bundle has none."""
        if self.sae_path is None:
            return None
        from monitor.sae import load

        return load(self.sae_path)


WEIGHT_SUFFIXES = (".safetensors", ".npz")


def bundle_identity(folder: Path) -> str:
    """What makes two bundles score alike: ``bundle.yaml`` and every weight file below the folder.

    Drift state is keyed by it, so a swapped bundle never compares its verdicts with another's.
    """
    h = hashlib.sha256()
    files = [folder / "bundle.yaml"]
    files += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def default_bundle_path() -> Path:
    """Folder of the embedded default bundle."""
    return Path(__file__).resolve().parent.parent / "assets" / "default"
