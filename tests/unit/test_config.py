from pathlib import Path

import pytest

from headrace.config import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "headrace.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_SERVER__PORT", raising=False)
    settings = load_settings(None)
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert settings.auth.enabled is True
    assert settings.resolved_database_url.startswith("sqlite+aiosqlite:///")


def test_unknown_keys_name_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  prot: 9\nmodels:\n  - name: a\n"
        "    deployments: [{provider: echo, model: x, bogus: 1}]\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "server.prot: unknown key" in message
    assert "models.0.deployments.0.bogus: unknown key" in message


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  host: 0.0.0.0\n")
    monkeypatch.setenv("HEADRACE_SERVER__PORT", "9100")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"


def test_model_catalog_from_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  - name: gpt-4o-mini
    deployments:
      - provider: openai_compatible
        model: gpt-4o-mini
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY
        timeouts: {connect_s: 2, first_token_s: 10, total_s: 60}
      - provider: openai_compatible
        model: qwen2.5
        base_url: http://127.0.0.1:11434/v1
""",
    )
    settings = load_settings(path)
    (model,) = settings.models
    assert [d.model for d in model.deployments] == ["gpt-4o-mini", "qwen2.5"]
    assert model.deployments[0].timeouts.first_token_s == 10


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: []\nserver: {port: -1}\n", "server.port"),
        ("models:\n  - name: a\n    deployments: []\n", "models.0.deployments"),
        (
            "models:\n  - {name: a, deployments: [{provider: echo, model: x}]}\n"
            "  - {name: a, deployments: [{provider: echo, model: y}]}\n",
            "repeated: a",
        ),
        ("- just\n- a list\n", "mapping at the top level"),
        ("server: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_files_say_what_is_wrong(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_settings(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_settings(tmp_path / "absent.yaml")
