"""Tests for octofs/errors.py and its generated catalogue, docs/EXIT_CODES.md."""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from types import ModuleType

import pytest

from octofs import errors
from octofs.errors import ConfigValueError, OctofsError

ROOT = Path(__file__).resolve().parents[2]


def _load_errorlist() -> ModuleType:
    spec = importlib.util.spec_from_file_location("errorlist", ROOT / "scripts" / "errorlist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


errorlist = _load_errorlist()
CLASSES = errorlist.error_classes()


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def test_walk_finds_every_class_in_the_module() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, OctofsError)
    }
    assert set(CLASSES) == defined
    assert len(CLASSES) >= 27


def test_no_two_classes_share_an_exit_code() -> None:
    codes = [cls.exit_code for cls in CLASSES]
    assert len(codes) == len(set(codes)), errorlist.duplicate_codes(CLASSES)


def test_duplicate_codes_are_detected(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clash = type("Clash", (), {"exit_code": 11, "__doc__": "clash", "hint": None})  # ConfigFileError's code
    monkeypatch.setattr(errorlist, "error_classes", lambda: [*CLASSES, clash])
    assert errorlist.duplicate_codes(errorlist.error_classes()) == {11: ["ConfigFileError", "Clash"]}
    assert errorlist.main(["--check"]) == 1
    assert "exit code 11 is used by ConfigFileError, Clash" in capsys.readouterr().err


def test_exit_codes_fit_in_a_status_byte_below_signals() -> None:
    assert all(1 <= cls.exit_code < 128 for cls in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_template_fills(cls: type[OctofsError]) -> None:
    template = errorlist.template(cls)
    assert template, f"{cls.__name__} has no docstring template"
    names = _fields(template) + _fields(cls.hint or "")
    values = {name: f"<{name}-value>" for name in names}
    err = cls(**values)
    assert "{" not in err.message and "}" not in err.message
    for name in _fields(template):
        assert f"<{name}-value>" in err.message
    assert str(err) == err.message
    assert "\n" not in err.message
    if cls.hint is not None:
        assert err.hint_text is not None and "{" not in err.hint_text
    else:
        assert err.hint_text is None


def test_missing_field_stays_visible() -> None:
    err = ConfigValueError(path="v.yaml", line=3, key="vault")
    assert err.message == "v.yaml:3: vault: {reason}"


def test_exit_codes_md_is_up_to_date() -> None:
    doc = ROOT / "docs" / "EXIT_CODES.md"
    assert doc.read_text(encoding="utf-8") == errorlist.render(), "run: python scripts/errorlist.py"
    assert errorlist.main(["--check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "EXIT_CODES.md"
    stale.write_text(errorlist.render().replace("| 13 | ConfigValueError", "| 14 | ConfigValueError"))
    assert errorlist.main(["--check", "--output", str(stale)]) == 1
    assert errorlist.main(["--output", str(stale)]) == 0
    assert errorlist.main(["--check", "--output", str(stale)]) == 0


def test_catalogue_lists_every_code_once() -> None:
    text = errorlist.render()
    for cls in CLASSES:
        assert text.count(f"| {cls.exit_code} | {cls.__name__} |") == 1
