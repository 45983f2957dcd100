"""Labeled data for the operator's model, in ``<work>/data`` (shaped like ``data/detectors``).

Most sets do not depend on the model: their responses are written (deception, sycophancy, the
written refusals) or there are none (harmfulness reads the prompt). They are copied. Three sets
hold the model's own answers and are rebuilt from *this* model's answers with the builders the
default bundle's files were made with (``monitor.detectors._datasets``): ``refusal.jsonl``,
``harmful_compliance.jsonl`` and ``ordinary.jsonl``.

``prepare`` copies the model-independent files (cut to ``limit`` rows per source when asked) and
returns the prompts the model must answer; ``rebuild`` turns the answers into the three sets.
``limit`` keeps whole prompt groups, labels interleaved, in a fixed order (sha256 of the group),
so a small slice still has both classes in every source and in the validation split.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from monitor.answers import answers_prompt
from monitor.detectors._activations import DATA, EVALUATION_ONLY
from monitor.detectors._compliance import ORDINARY_FILE, ordinary_rows
from monitor.detectors._datasets import COMPLIANCE_SOURCES, compliance_rows, jsonl_text, refusal_rows
from monitor.detectors._ordinary import ANSWERS_FILE, KINDS, ORDINARY, load_ordinary_answers, load_ordinary_prompts
from monitor.text import load_lexicon

__all__ = ["ANSWER_TOKENS", "COPIED", "LIMITED", "REBUILT", "limit_rows", "prepare", "rebuild"]

# Copied as they are: label files, the evaluation-only groups, the refusal styles.
COPIED = ("hh_rlhf_opener_labels.jsonl", "hh_rlhf_fit_opener_labels.jsonl", EVALUATION_ONLY, "refusal_styles.yaml")
# Copied, cut to ``limit`` rows per source when asked: (file, the key that labels a row).
LIMITED = (
    ("deception.jsonl", "label"),
    ("deceptive_answer.jsonl", "label"),
    ("sycophancy.jsonl", "label"),
    ("harmfulness.jsonl", "label"),
    ("refusal_prompts.jsonl", "harmful"),
)
# Rebuilt from the model's answers.
REBUILT = ("refusal.jsonl", "harmful_compliance.jsonl", f"{ORDINARY_FILE}.jsonl")
# Prompt sets the model answers; an answer's id is "<set>/<id in the set>".
SETS = ("refusal", "confusable", "ordinary")
# The greedy answer length per set, in tokens: what ``data/detectors`` and ``data/ordinary`` were
# generated with (their SOURCE.md files), so the default recipe reproduces the shipped bundle. A
# detector's recall at its threshold depends on the answer length it was fitted on (docs/your-model.md).
ANSWER_TOKENS = {"refusal": 48, "confusable": 40, "ordinary": 32}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _order(group: str) -> str:
    return hashlib.sha256(group.encode()).hexdigest()


def limit_rows(
    rows: Sequence[dict[str, Any]], limit: int | None, label_key: str = "label", source_key: str = "source"
) -> list[dict[str, Any]]:
    """At most about ``limit`` rows per source, whole groups only, in file order.

    Groups are taken in sha256 order, alternating between the label sets groups have (a pair
    group with both labels is its own kind), until the source has ``limit`` rows.
    """
    if limit is None:
        return list(rows)
    groups: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r[source_key]), {}).setdefault(str(r["group"]), []).append(i)
    keep: set[int] = set()
    for by_group in groups.values():
        strata: dict[tuple[str, ...], list[str]] = {}
        for g, idx in by_group.items():
            strata.setdefault(tuple(sorted({str(rows[i].get(label_key)) for i in idx})), []).append(g)
        queues = [sorted(gs, key=_order) for _, gs in sorted(strata.items())]
        taken = 0
        while taken < limit and any(queues):
            for q in queues:
                if q and taken < limit:
                    idx = by_group[q.pop(0)]
                    keep.update(idx)
                    taken += len(idx)
    return [r for i, r in enumerate(rows) if i in keep]


def prepare(
    work: Path,
    limit: int | None = None,
    source: Path = DATA,
    ordinary: Path = ORDINARY,
    log: Callable[[str], None] = print,
    max_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Write ``<work>/data``'s model-independent files; return the prompts to answer
    (``{"id", "prompt", "max_new_tokens"}``: ``max_new_tokens`` when given, else ``ANSWER_TOKENS`` of the set).

    The prompts: every refusal prompt, the confusable-safe prompts ``harmful_compliance`` is
    measured on, and the ordinary workload (``data/ordinary``, read through symlinks in
    ``<work>/ordinary`` so prompt ids stay those of the full files).
    """
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(source / name, data / name)
    kept: dict[str, list[dict[str, Any]]] = {}
    for name, label_key in LIMITED:
        kept[name] = limit_rows(_read(source / name), limit, label_key)
    harm = kept["harmfulness.jsonl"]
    # harmful_compliance is built from the refusal set's rows of the prompts no harmfulness fit uses:
    # keep the refusal prompts of those groups even when the limit cut them.
    wanted = {str(r["group"]) for r in harm if r["source"] in COMPLIANCE_SOURCES}
    all_refusal = _read(source / "refusal_prompts.jsonl")
    have = {str(r["group"]) for r in kept["refusal_prompts.jsonl"]}
    kept["refusal_prompts.jsonl"] = [r for r in all_refusal if str(r["group"]) in have | wanted]
    for name, rows in kept.items():
        (data / name).write_text(jsonl_text(rows), encoding="utf-8")
    # Confusable-safe prompts: only those harmful_compliance reads (its held-out families).
    held_out = {str(r["prompt"]) for r in harm if r["source"] == "rd_val_confusable"}
    confusable = [r for r in _read(source / "confusable_safe.jsonl") if str(r["prompt"]) in held_out]
    (data / "confusable_safe.jsonl").write_text(jsonl_text(confusable), encoding="utf-8")
    _link_ordinary(work / "ordinary", ordinary)
    workload = limit_rows(
        [
            {"source": p.folder, "group": p.id, "kind": p.kind, "prompt": p.prompt}
            for p in load_ordinary_prompts(ordinary)
        ],
        limit,
        label_key="kind",
    )
    prompts = [{"id": f"refusal/{r['group']}", "prompt": r["prompt"]} for r in kept["refusal_prompts.jsonl"]]
    prompts += [{"id": f"confusable/{r['group']}", "prompt": r["prompt"]} for r in confusable]
    prompts += [{"id": f"ordinary/{r['group']}", "prompt": r["prompt"]} for r in workload]
    for p in prompts:
        p["max_new_tokens"] = max_new_tokens or ANSWER_TOKENS[p["id"].partition("/")[0]]
    sizes = ", ".join(f"{n} {sum(p['id'].startswith(n + '/') for p in prompts)}" for n in SETS)
    log(f"data: {len(COPIED) + len(LIMITED) + 1} files in {data}; prompts to answer: {sizes}")
    return prompts


def _link_ordinary(folder: Path, ordinary: Path) -> None:
    """``<work>/ordinary``: the workload's prompt folders (symlinked), for ``load_ordinary_answers``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in KINDS:
        link = folder / name
        if link.is_symlink() or link.exists():
            if link.resolve() == (ordinary / name).resolve():
                continue
            link.unlink()
        link.symlink_to((ordinary / name).resolve(), target_is_directory=True)


def rebuild(
    work: Path, answers: Path, prompts: Sequence[dict[str, Any]], log: Callable[[str], None] = print
) -> dict[str, int]:
    """Split the answers to ``prompts`` (answers to other prompts, from an earlier run with another
    ``limit``, or of another length, are left out) into their sets and rebuild the three
    model-dependent files; rows per file."""
    data = work / "data"
    latest = {str(r["id"]): r for r in _answers(answers) if "id" in r}  # a regenerated answer replaces the old
    by_set: dict[str, list[dict[str, Any]]] = {s: [] for s in SETS}
    for p in prompts:
        r = latest.get(str(p["id"]))
        if r is None or not answers_prompt(r, p):
            continue
        kind, _, rid = str(r["id"]).partition("/")
        if kind in by_set:
            by_set[kind].append({**r, "id": rid})
    own = {  # {"group", "prompt", "response"}: what the builders read
        "model_responses.jsonl": by_set["refusal"],
        "confusable_responses.jsonl": by_set["confusable"],
    }
    for name, rows in own.items():
        _write(data / name, ({"group": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in rows))
    _write(work / "ordinary" / ANSWERS_FILE, by_set["ordinary"])
    built = {
        "refusal.jsonl": refusal_rows(data, log=log),
    }
    _write(data / "refusal.jsonl", built["refusal.jsonl"])
    built["harmful_compliance.jsonl"] = compliance_rows(data)
    built[f"{ORDINARY_FILE}.jsonl"] = ordinary_rows(load_ordinary_answers(work / "ordinary"), load_lexicon("refusal"))
    for name in REBUILT[1:]:
        _write(data / name, built[name])
    sizes = {name: len(rows) for name, rows in built.items()}
    log("data: rebuilt from this model's answers: " + ", ".join(f"{k} {v} rows" for k, v in sizes.items()))
    return sizes


def _answers(path: Path) -> list[dict[str, Any]]:
    """The answers file's rows; a torn line (an interrupted run) is skipped: that prompt is answered again."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _write(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text(jsonl_text(rows), encoding="utf-8")
