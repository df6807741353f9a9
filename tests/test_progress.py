"""Progress off a terminal is log lines, not carriage returns."""

import logging

from fedfactory.progress import LogProgress, progress


def test_progress_off_a_terminal_logs_lines_with_the_postfix(caplog, capsys):
    caplog.set_level(logging.INFO, logger="fedfactory")
    bar = progress(range(3), "module client-001_class-002", "step", every_s=0.0)
    assert isinstance(bar, LogProgress)  # pytest's stderr is not a terminal
    for i in bar:
        bar.set_postfix(loss=f"{i / 10:.1f}")
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["module client-001_class-002: 1/3 step, loss=0.0", "module client-001_class-002: 2/3 step, "
                         "loss=0.1", "module client-001_class-002: 3/3 step, loss=0.2"]
    assert "\r" not in capsys.readouterr().err


def test_quiet_and_short_progress_log_nothing(caplog):
    caplog.set_level(logging.INFO, logger="fedfactory")
    assert list(progress(range(4), "off", "step", enabled=False, every_s=0.0)) == [0, 1, 2, 3]
    assert list(progress(iter(range(4)), "fast", "step")) == [0, 1, 2, 3]  # done before the first 10 s
    assert caplog.records == []
