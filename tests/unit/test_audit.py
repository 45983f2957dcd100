"""The audit log's promises: a completed future means the line is on disk; a bad record fails
alone; files rotate by size; a line torn by a kill is ended before the next record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from monitor.audit import AuditLog, AuditUnavailable


def test_future_completes_only_once_the_line_is_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    try:
        futures = [log.write({"request_id": f"r{i}"}) for i in range(200)]
        for i, fut in enumerate(futures):
            fut.result(10)
            # read with a fresh handle: what another process (or a restart) would see
            lines = path.read_text().splitlines()
            assert json.loads(lines[i])["request_id"] == f"r{i}"
    finally:
        log.close()


def test_a_record_that_is_not_json_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    try:
        bad, good = log.write({"request_id": "nan", "x": math.nan}), log.write({"request_id": "ok"})
        with pytest.raises(AuditUnavailable, match="not JSON-able"):
            bad.result(10)
        assert good.result(10) is None
    finally:
        log.close()
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["ok"]


def test_rotation_by_size_keeps_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1000, backups=2)
    try:
        for i in range(60):  # ~40 bytes a line: several rotations
            log.write({"request_id": f"rotate-{i:03d}", "pad": "x" * 10}).result(10)
    finally:
        log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    newest_first = [
        json.loads(x)["request_id"]
        for p in ("audit.jsonl", "audit.jsonl.1")
        for x in (tmp_path / p).read_text().splitlines()[:1]
    ]
    assert newest_first[0] > newest_first[1]  # .1 holds older records than the live file
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "rotate-059"


def test_a_torn_last_line_is_ended_before_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"request_id": "whole"}\n{"request_id": "to')  # what a SIGKILL mid-write leaves
    log = AuditLog(path)
    try:
        log.write({"request_id": "after"}).result(10)
    finally:
        log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"request_id": "whole"}' and lines[1] == '{"request_id": "to'
    assert json.loads(lines[2]) == {"request_id": "after"}


LINE_BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_unicode_line_breaks_in_a_record_never_split_its_line(tmp_path: Path) -> None:
    """A reader that splits on every Unicode line break (str.splitlines) finds one line per record."""
    path = tmp_path / "audit.jsonl"
    ids = [f"req{brk}{i}" for i, brk in enumerate(LINE_BREAKS)]
    log = AuditLog(path)
    try:
        for fut in [log.write({"request_id": rid, "labels": {"k": rid}}) for rid in ids]:
            fut.result(10)
    finally:
        log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(ids)
    assert [json.loads(line)["request_id"] for line in lines] == ids
    assert "\\u2028" in lines[ids.index("req\u20289")]


def test_preference_pairs_keep_one_line_per_record(tmp_path: Path) -> None:
    from monitor.critique._revise import PreferenceLog

    prefs = PreferenceLog(tmp_path / "prefs.jsonl")
    prefs.append({"original": "a\u2028b", "revised": "c\u2029d\x85e"})
    lines = (tmp_path / "prefs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"original": "a\u2028b", "revised": "c\u2029d\x85e"}]


def test_a_full_disk_logs_one_warning_per_interval_not_one_per_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log file is a link to /dev/full: every write fails with a real ENOSPC."""
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    results: list[str] = []
    log = AuditLog(path, on_result=results.append)
    try:
        with caplog.at_level("WARNING", logger="monitor.audit"):
            for i in range(40):  # one record at a time: 40 failed group commits
                with pytest.raises(AuditUnavailable, match="No space left on device"):
                    log.write({"request_id": f"r{i}"}).result(10)
    finally:
        log.close()
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert warnings == [f"audit_log: could not write to {path}: No space left on device"]
    assert results == ["dropped"] * 40
