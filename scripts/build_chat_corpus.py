"""Build ``data/chat_corpus/conversations.jsonl.gz``: the chat corpus the default SAE trains on.

One JSON object per line: ``{"source", "messages": [{"role", "content"}, ...]}``, from GSM8K
train+test, GPTeacher roleplay+codegen and HH-RLHF harmless-base test ("chosen" transcripts),
in a seeded shuffle. Sources and licenses: data/chat_corpus/SOURCE.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _hh_turns(transcript: str) -> list[dict[str, str]]:
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + transcript.strip())
    turns = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if speaker == "Human" else "assistant"
        if text.strip():
            turns.append({"role": role, "content": text.strip()})
    return turns


def build(shared: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in (shared / "chat_corpus/gsm8k" / name).read_text().splitlines():
            g = json.loads(line)
            answer = re.sub(r"<<[^>]*>>", "", g["answer"]).replace("####", "The answer is")
            rows.append(
                {
                    "source": "gsm8k",
                    "messages": [{"role": "user", "content": g["question"]}, {"role": "assistant", "content": answer}],
                }
            )
    for name in ("roleplay-simple-deduped-roleplay-instruct.json", "codegen-instruct.json"):
        for g in json.loads((shared / "chat_corpus/gpteacher" / name).read_text()):
            prompt = g["instruction"] + (f"\n\n{g['input']}" if g.get("input") else "")
            rows.append(
                {
                    "source": "gpteacher",
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": g["response"]}],
                }
            )
    for line in (shared / "chat_corpus/hh_rlhf_harmless_test/harmless-base_test.jsonl").read_text().splitlines():
        turns = _hh_turns(json.loads(line)["chosen"])
        if turns and turns[0]["role"] == "user" and turns[-1]["role"] == "assistant":
            rows.append({"source": "hh_rlhf_harmless", "messages": turns})
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "chat_corpus" / "conversations.jsonl.gz")
    ns = parser.parse_args()
    rows = build(ns.shared)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(ns.out, "wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"wrote {len(rows)} conversations to {ns.out}")


if __name__ == "__main__":
    main()
