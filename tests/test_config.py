"""lungcbir.config: every environment variable and default in one place."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from lungcbir import config
from lungcbir.config import ConfigError, Settings

ALL_VARIABLES = (config.DB_ENV, config.INDEX_DIR_ENV, config.DATA_ENV, config.MAX_VOXELS_ENV, config.TOKEN_ENV,
                 config.DICOMWEB_TOKEN_ENV, config.DICOMWEB_USER_ENV, config.DICOMWEB_PASSWORD_ENV,
                 config.DICOMWEB_RESPONSE_SECONDS_ENV, config.DICOMWEB_MAX_PAGES_ENV, config.CACHE_DIR_ENV,
                 config.RUNTIME_ENV, config.THREADS_ENV)


def test_defaults_without_any_variable():
    settings = Settings.from_environment({})
    assert settings == Settings()
    assert settings.db_url == "sqlite:///db/lungcbir.sqlite" and settings.index_dir == "index"
    assert settings.data_root == Path("../shared/data") and settings.max_voxels == 512 * 512 * 768
    assert settings.token is None and settings.dicomweb_token is None and settings.dicomweb_user is None


def test_every_variable_overrides_its_default():
    environ = {config.DB_ENV: "postgresql+psycopg://u@h/db", config.INDEX_DIR_ENV: "/srv/index",
               config.DATA_ENV: "/data", config.MAX_VOXELS_ENV: " 1234 ", config.TOKEN_ENV: "t" * 20,
               config.DICOMWEB_TOKEN_ENV: "dt", config.DICOMWEB_USER_ENV: "ann", config.DICOMWEB_PASSWORD_ENV: "pw",
               config.DICOMWEB_RESPONSE_SECONDS_ENV: "2.5", config.DICOMWEB_MAX_PAGES_ENV: "7",
               config.CACHE_DIR_ENV: "/srv/cache", config.RUNTIME_ENV: "torch", config.THREADS_ENV: "3"}
    settings = Settings.from_environment(environ)
    assert dataclasses.astuple(settings) == ("postgresql+psycopg://u@h/db", "/srv/index", Path("/data"), 1234,
                                             "t" * 20, "dt", "ann", "pw", 2.5, 7, Path("/srv/cache"), "torch", 3)
    assert sorted(ALL_VARIABLES) == sorted(environ)  # the test names every variable there is


def test_empty_variables_count_as_unset_and_os_environ_is_the_default(monkeypatch):
    assert Settings.from_environment({name: "" for name in ALL_VARIABLES}) == Settings()
    monkeypatch.setenv(config.INDEX_DIR_ENV, "elsewhere")
    assert Settings.from_environment().index_dir == "elsewhere"


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_a_bad_voxel_limit_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=f"LUNGCBIR_MAX_VOXELS='{value}': expected a positive whole number"):
        Settings.from_environment({config.MAX_VOXELS_ENV: value})


@pytest.mark.parametrize("name, value, expected", [
    (config.DICOMWEB_RESPONSE_SECONDS_ENV, "soon", "number of seconds"),
    (config.DICOMWEB_RESPONSE_SECONDS_ENV, "0", "number of seconds"),
    (config.DICOMWEB_RESPONSE_SECONDS_ENV, "inf", "number of seconds"),
    (config.DICOMWEB_RESPONSE_SECONDS_ENV, "nan", "number of seconds"),
    (config.DICOMWEB_MAX_PAGES_ENV, "2.5", "whole number of pages"),
    (config.DICOMWEB_MAX_PAGES_ENV, "-1", "whole number of pages"),
])
def test_a_bad_dicomweb_bound_is_one_clear_error(name, value, expected):
    with pytest.raises(ConfigError, match=f"^{name}='{value}': expected a positive {expected}$"):
        Settings.from_environment({name: value})


@pytest.mark.parametrize("value", ["many", "0", "-2"])
def test_a_bad_thread_count_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=f"LUNGCBIR_THREADS='{value}': expected a positive whole number"):
        Settings.from_environment({config.THREADS_ENV: value})


def test_the_cache_follows_xdg_cache_home_when_absolute():
    assert Settings.from_environment({"XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/xdg/lungcbir")
    assert Settings.from_environment({"XDG_CACHE_HOME": "relative"}).cache_dir == Path.home() / ".cache/lungcbir"
    assert Settings.from_environment({}).cache_dir == Path.home() / ".cache/lungcbir"


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().db_url = "sqlite:///other.sqlite"  # type: ignore[misc]


def test_retriever_takes_its_store_from_settings_and_arguments_win(monkeypatch):
    from lungcbir.retrieval import Retriever

    monkeypatch.setenv(config.DB_ENV, "sqlite:///from-env.sqlite")
    assert Retriever().db_url == "sqlite:///from-env.sqlite"
    given = Settings(db_url="sqlite:///given.sqlite", index_dir="given-index")
    retriever = Retriever(settings=given)
    assert (retriever.db_url, retriever.index_dir) == ("sqlite:///given.sqlite", "given-index")
    assert Retriever("sqlite:///arg.sqlite", settings=given).db_url == "sqlite:///arg.sqlite"


def test_data_root_is_relative_to_the_working_directory_not_the_package(tmp_path, monkeypatch):
    """An installed wheel lives in site-packages: the data path must not be derived from there."""
    from lungcbir.datasets import data_root

    monkeypatch.delenv(config.DATA_ENV, raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data_root() == tmp_path / "shared" / "data"
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path / "mine"))
    assert data_root() == tmp_path / "mine"


def test_cli_store_options_default_to_the_environment(tmp_path, phantom_dir, tiny_weights):
    from lungcbir.cli import main

    database = tmp_path / "env" / "db.sqlite"
    environ = {config.DB_ENV: f"sqlite:///{database}", config.INDEX_DIR_ENV: str(tmp_path / "env-index")}
    result = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png" / "phantom01"), "--quiet",
                                       "--weights", tiny_weights], env=environ)
    assert result.exit_code == 0, result.output
    assert database.is_file() and (tmp_path / "env-index").is_dir()
    help_text = CliRunner().invoke(main, ["stats", "--help"]).output
    assert "sqlite:///db/lungcbir.sqlite" in help_text and "LUNGCBIR_DB" in help_text


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    from lungcbir.cli import main

    result = CliRunner().invoke(main, ["stats", "--db", f"sqlite:///{tmp_path / 'x.sqlite'}"],
                                env={config.MAX_VOXELS_ENV: "lots"})
    assert result.exit_code == 2
    assert result.output.strip() == "error: LUNGCBIR_MAX_VOXELS='lots': expected a positive whole number of voxels"


def test_no_module_but_config_reads_the_environment():
    package = Path(config.__file__).parent
    readers = [path.name for path in package.glob("*.py")
               if path.name != "config.py" and ("os.environ" in path.read_text() or "getenv" in path.read_text())]
    assert readers == []
    assert "envvar=" not in (package / "cli.py").read_text()
