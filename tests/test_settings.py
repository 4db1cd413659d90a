"""Settings: documented, validated, named in errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from heron.settings import SettingsError, load_settings, render_configuration_docs

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_docs_match_the_code() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == render_configuration_docs(), (
        "run `heron config docs --output docs/configuration.md`"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HERON_SERVER_PORT", "eighty"),
        ("HERON_SERVER_PORT", "70000"),
        ("HERON_DATABASE_URL", "mysql://localhost/heron"),
        ("HERON_REDIS_URL", "http://localhost"),
        ("HERON_SECRET_KEY", "short"),
        ("HERON_LIMITS_MAX_BODY_BYTES", "-1"),
        ("HERON_SERVER_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"invalid setting {variable}: ")
    assert "\n" not in str(caught.value)


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERON_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.is_sqlite
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'heron.db'}"
    assert settings.server.port == 8000
    assert settings.server.host == "127.0.0.1"


def test_plain_postgres_urls_get_the_async_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERON_DATABASE_URL", "postgresql://u:p@db:5432/heron")
    assert load_settings().database_url == "postgresql+asyncpg://u:p@db:5432/heron"
