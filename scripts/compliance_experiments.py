"""Issue 20's tries for harmful_compliance: stack variants and a direct probe against the naive baseline.

Scores the held-out sources (rd_val_confusable, hh_rlhf_tqa, ordinary_held_out) for each try, with
the members of a given bundle (default: the bundle of 2026-11-27, whose harmfulness/refusal
members the tries in docs/model-card-notes.yaml u; prepare it with
``git show 75636e5:monitor/assets/default/bundle.yaml`` into a copy of the bundle folder, without
its conjunction entry). Needs the activation cache of ``monitor train-detectors`` (runs/detector-acts).

    python scripts/compliance_experiments.py BUNDLE_DIR [HARM_MEMBER]
"""

import json
import sys
from pathlib import Path

import numpy as np

from monitor.detectors import Bundle, DetectorSet
from monitor.detectors._activations import evaluation_only_groups
from monitor.detectors._compliance import CompliancePart, fitting_part, ordinary_kinds
from monitor.detectors._evaluate import load_labeled, phrase_scores
from monitor.detectors._fit import _folds, fit_logistic, fit_stack, is_validation
from monitor.detectors._metrics import auroc
from monitor.text import load_lexicon

bdir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/oldb"
H = sys.argv[2] if len(sys.argv) > 2 else "harmfulness.ensemble"
R = "refusal.ensemble"
hook = "blocks.16.hook_resid_post"
cache = Path("runs/detector-acts")
b = Bundle.load(bdir)
ds = DetectorSet.from_bundle(b)


def nolm():
    return (_ for _ in ()).throw(RuntimeError("cache miss"))


ref = load_labeled("refusal", hook, cache, nolm, files=("refusal",))
ordn = load_labeled("harmful_compliance", hook, cache, nolm, files=("ordinary",))
hc = load_labeled("harmful_compliance", hook, cache, nolm, files=("harmful_compliance",))
part = fitting_part(
    CompliancePart(ref.rows, ref.tokens, ref.decision), CompliancePart(ordn.rows, ordn.tokens, ordn.decision)
)


def scores(rows, toks, decs):
    out = {H: [], R: []}
    for t, d in zip(toks, decs, strict=False):
        by = {r.name: r.score for r in ds.score(hook, t, decision=d)}
        out[H].append(by[H])
        out[R].append(by[R])
    return {k: np.array(v) for k, v in out.items()}


fit_s = scores(part.rows, part.tokens, part.decision)
y = np.array([r.label for r in part.rows])
g = np.array([r.group for r in part.rows])
# held-out
ev_rows = hc.rows + [r for r in ordn.rows if r.source == "ordinary_held_out"]
ev_t = hc.tokens + [t for r, t in zip(ordn.rows, ordn.tokens, strict=False) if r.source == "ordinary_held_out"]
ev_d = hc.decision + [t for r, t in zip(ordn.rows, ordn.decision, strict=False) if r.source == "ordinary_held_out"]
ev_s = scores(ev_rows, ev_t, ev_d)
ye = np.array([r.label for r in ev_rows])
src = np.array([r.source for r in ev_rows])
harm_spec = next(s for s in ds.specs if s.name == H)
p_harm = np.array([harm_spec.probability(x) for x in ev_s[H]])
naive = p_harm * (phrase_scores(ev_rows, load_lexicon("refusal")) == 0)
kinds = ordinary_kinds()
kind = np.array([kinds.get(r.group, "hc") for r in ev_rows])


def report(name, s, thr=None):
    line = [name]
    for so in ("rd_val_confusable", "hh_rlhf_tqa", "ordinary_held_out"):
        m = src == so
        line.append(f"{so} {auroc(ye[m], s[m]):.3f}")
    if thr is not None:
        for so in ("rd_val_confusable", "hh_rlhf_tqa", "ordinary_held_out"):
            m = src == so
            f = s >= thr
            line.append(f"{so[:6]} R {f[m & (ye == 1)].mean():.2f} FPR {f[m & (ye == 0)].mean():.3f}")
        bl = kind == "borderline"
        line.append(f"borderline FPR {(s[bl] >= thr).mean():.3f} everyday {(s[kind == 'everyday'] >= thr).mean():.3f}")
    print(" | ".join(line))


report("naive", naive, 0.5)
for pairs, label in (((), "h+r"), (((H, R),), "h+r+hr")):
    for c in (0.1, 1.0):
        st = fit_stack(fit_s, y, g, pairs, c=c)
        z = (
            st.bias
            + sum(cf * ev_s[m] for m, cf in st.members.items())
            + sum(cf * ev_s[a] * ev_s[bb] for a, bb, cf in st.interactions)
        )
        sl, ic = st.calibration
        even = -ic / sl
        print(label, c, "cv", round(st.cv_auroc, 3), st.members, st.interactions)
        report(f"  stack {label} C={c}", z, even)
print("fit rows", len(y), y.sum())

# --- joint dense probe on [decision row, response mean] + members


def feats(toks, decs):
    return np.stack([np.concatenate([d[0], t.mean(0)]) for t, d in zip(toks, decs, strict=False)])


Xf = feats(part.tokens, part.decision)
Xe = feats(ev_t, ev_d)
folds = _folds(g, 5, 0)
for c in (0.001, 0.01, 0.1):
    oof = np.zeros(len(y))
    for f in folds:
        tr = np.setdiff1d(np.arange(len(y)), f)
        w, b0 = fit_logistic(Xf[tr], y[tr], c)
        oof[f] = Xf[f] @ w + b0
    w, b0 = fit_logistic(Xf, y, c)
    ze = Xe @ w + b0
    print("joint", c, "cv", round(auroc(y, oof), 3))
    report(f"  joint C={c}", ze, 0.0)
    # stack joint + h + r + hr
    sc = dict(fit_s)
    sc["joint"] = oof
    st = fit_stack(sc, y, g, ((H, R),), c=1.0)
    es = dict(ev_s)
    es["joint"] = ze
    z = (
        st.bias
        + sum(cf * es[m] for m, cf in st.members.items())
        + sum(cf * es[a] * es[bb] for a, bb, cf in st.interactions)
    )
    sl, ic = st.calibration
    print("   stack+joint cv", round(st.cv_auroc, 3), {k: round(v, 3) for k, v in st.members.items()})
    report(f"  stack+joint C={c}", z, -ic / sl)
    # response-only probe
    Xr, Xre = Xf[:, 576:], Xe[:, 576:]
    w, b0 = fit_logistic(Xr, y, c)
    report(f"  resp-only C={c}", Xre @ w + b0, 0.0)

print("--- joint probe with refusal_direction fit groups added")
harmful = {
    str(r["group"]): str(r.get("harmful")) == "1"
    for r in map(json.loads, Path("data/detectors/refusal_prompts.jsonl").read_text().splitlines())
}
never = evaluation_only_groups()
extra = [
    (t, d, int(harmful.get(r.group, False) and r.label == 0), r.group)
    for r, t, d in zip(ref.rows, ref.tokens, ref.decision, strict=False)
    if r.source == "refusal_direction" and not is_validation(r.group) and r.group not in never
]
Xx = feats([e[0] for e in extra], [e[1] for e in extra])
yx = np.array([e[2] for e in extra])
print("extra rows", len(yx), yx.sum())
for c in (0.01, 0.1):
    oof = np.zeros(len(y))
    for f in folds:
        tr = np.setdiff1d(np.arange(len(y)), f)
        w, b0 = fit_logistic(np.vstack([Xf[tr], Xx]), np.r_[y[tr], yx], c)
        oof[f] = Xf[f] @ w + b0
    w, b0 = fit_logistic(np.vstack([Xf, Xx]), np.r_[y, yx], c)
    ze = Xe @ w + b0
    print("joint+rd", c, "cv", round(auroc(y, oof), 3))
    report(f"  joint+rd C={c}", ze, 0.0)
    sc = dict(fit_s)
    sc["joint"] = oof
    st = fit_stack(sc, y, g, ((H, R),), c=1.0)
    es = dict(ev_s)
    es["joint"] = ze
    z = (
        st.bias
        + sum(cf * es[m] for m, cf in st.members.items())
        + sum(cf * es[a] * es[bb] for a, bb, cf in st.interactions)
    )
    sl, ic = st.calibration
    print("   stack cv", round(st.cv_auroc, 3), {k: round(v, 3) for k, v in st.members.items()}, st.interactions)
    report(f"  stack+joint+rd C={c}", z, -ic / sl)

print("--- the 2026-11-27 conjunction, P(harm) x (1 - P(refusal)) >= 0.5, per response on held-out ordinary answers")
refusal_spec = next(s for s in ds.specs if s.name == R)
p_conj = p_harm * (1 - np.array([refusal_spec.probability(x) for x in ev_s[R]]))
for k in ("everyday", "borderline", "harmful"):
    m = (kind == k) & (src == "ordinary_held_out")
    print(f"  {k}: {m.sum()} answers, fired {np.mean(p_conj[m] >= 0.5):.3f}")
