"""panther._progress: one tqdm helper, quiet unless asked or on a terminal."""
import io

import pytest

from panther._progress import progress, progress_enabled


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_disabled_writes_nothing():
    out = io.StringIO()
    assert list(progress(range(5), desc="quiet", enabled=False, file=out)) == list(range(5))
    bar = progress(total=3, desc="manual", enabled=False, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_enabled_writes_to_the_given_stream():
    out = io.StringIO()
    assert sum(progress(range(4), desc="counting", enabled=True, file=out, leave=True)) == 6
    text = out.getvalue()
    assert "counting" in text and "4/4" in text


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("PANTHER_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    # pytest sets PYTEST_CURRENT_TEST: quiet even on a terminal
    assert not progress_enabled(None, FakeTTY())
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert progress_enabled(None, FakeTTY())
    assert not progress_enabled(None, io.StringIO())  # a pipe / log file
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(None, FakeTTY())
    monkeypatch.setenv("PANTHER_PROGRESS", "1")
    assert progress_enabled(None, io.StringIO())
    monkeypatch.setenv("PANTHER_PROGRESS", "0")
    monkeypatch.delenv("CI")
    assert not progress_enabled(None, FakeTTY())
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, FakeTTY())


@pytest.mark.parametrize("enabled", [None, False])
def test_auto_is_quiet_under_pytest(enabled, capsys):
    for _ in progress(range(3), desc="auto", enabled=enabled):
        pass
    assert capsys.readouterr().err == ""
