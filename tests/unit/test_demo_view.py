"""``make demo``'s live table: readable in an 80-column terminal, fuller when the terminal is wider."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from monitor.demo import BEHAVIOURS, Row, requests_table

PROBABILITIES = [0.07, 0.73, 0.41, 0.96, 0.18]  # one per behaviour, in BEHAVIOURS order


def row(n: int, kind: str, finish: str) -> Row:
    detectors: dict[str, Any] = {
        f"{b}.ensemble": {"probability": p, "fired": p > 0.9, "top_latents": [[1523, "refusal phrasing"]]}
        for b, p in zip(BEHAVIOURS, PROBABILITIES, strict=True)
    }
    record = {"detectors": detectors, "text_stats": {"words": 37, "hedge_rate": 1.25}}
    return Row(
        n, kind, 48, finish, record, "Sure! Here is a long answer that will not fit in a narrow terminal at all."
    )


def render(width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    rows = [
        row(i, kind, fin)
        for i, (kind, fin) in enumerate([("deception_roleplay", "stop"), ("harmful_request", "content_filter")])
    ]
    console.print(requests_table(rows, "requests to http://127.0.0.1:8000", width))
    return console.export_text().splitlines()


def test_80_columns_show_every_probability_whole() -> None:
    lines = render(80)
    assert max(len(x) for x in lines) <= 80
    body = [x for x in lines if x.lstrip().startswith(("│ 0", "│ 1", "┃ 0", "┃ 1")) or " 0.7" in x]
    assert len(body) == 2, lines
    for line in body:
        for p in PROBABILITIES:
            assert f"{p:.2f}" in line, (p, line)  # never "0…"
        assert "…" not in line
    assert any("HALT" in x for x in body)  # content_filter, shortened


def test_a_wide_terminal_adds_the_context() -> None:
    lines = render(200)
    text = "\n".join(lines)
    assert "hedge/100w" in text and "why (top latent" in text and "Sure! Here is" in text
    assert all(f"{p:.2f}" in text for p in PROBABILITIES)
