"""Progress where no bar can be drawn: a background job's log gets plain lines, not silence."""

from __future__ import annotations

from igkd import progress


def test_plain_progress_lines_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every advance prints (pytest's stderr is no terminal)
    with progress.progress_bar(4, "epoch 1/2") as bar:
        for _ in range(4):
            bar.advance(1, items=64)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("epoch 1/2: 4/4 after") and "img/s" in lines[-1]


def test_disabled_progress_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.progress_bar(4, "epoch 1/2", enabled=False) as bar:
        bar.advance(1, items=64)
    assert capsys.readouterr().err == ""
