"""The accounts file: read and checked once at start-up, and the rule that routes an asset_id.

Every mistake that would send events to the wrong place, or nowhere, stops start-up with one
line naming it (a SettingsError: the worker prints it and exits 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config.accounts import REGIONS
from config.settings import Settings
from worker.errors import SettingsError

GOOD = """
[accounts.brand-a]
api_key_env = "BRAND_A_KEY"
region = "in"
asset_ids = ["a-1", "a-2"]

[accounts.brand-b]
api_key_file = "{key_file}"
api_url = "https://proxy.example/netcore"
asset_ids = ["b-1"]
"""


def settings(tmp_path: Path, text: str, **env: str) -> Settings:
    key_file = tmp_path / "b.key"
    key_file.write_text("key-b\n")
    path = tmp_path / "accounts.toml"
    path.write_text(text.replace("{key_file}", str(key_file)))
    return Settings.from_env({"NETCORE_ACCOUNTS_FILE": str(path), "BRAND_A_KEY": "key-a", **env})


def test_the_file_names_accounts_with_keys_from_the_environment_or_a_file(tmp_path: Path) -> None:
    s = settings(tmp_path, GOOD)
    assert s.accounts.names == ["brand-a", "brand-b"] and s.accounts.default is None
    a, b = s.accounts.all
    assert (a.api_key, a.upload_url) == ("key-a", REGIONS["in"] + "/v1/activity/upload")
    assert (b.api_key, b.upload_url) == ("key-b", "https://proxy.example/netcore/v1/activity/upload")
    assert "key-" not in repr(s) + repr(s.accounts)  # keys never in a repr (logs)


def test_an_asset_id_goes_to_its_account_else_to_default_else_nowhere(tmp_path: Path) -> None:
    without = settings(tmp_path, GOOD)
    route = without.accounts.route
    assert route("a-2").name == "brand-a" and route("b-1").name == "brand-b"  # type: ignore[union-attr]
    assert route("unknown") is None  # dead-lettered 'unroutable'
    with_default = settings(tmp_path, GOOD, NETCORE_API_KEY="key-default")
    assert with_default.accounts.names == ["default", "brand-a", "brand-b"]
    assert with_default.accounts.route("unknown").name == "default"  # type: ignore[union-attr]
    assert with_default.accounts.route("a-1").name == "brand-a"  # type: ignore[union-attr]


def test_without_a_file_the_single_account_is_netcore_api_key_as_before() -> None:
    s = Settings.from_env({"NETCORE_API_KEY": "k", "NETCORE_REGION": "eu"})
    (only,) = s.accounts.all
    assert (only.name, only.api_key, only.upload_url) == ("default", "k", s.upload_url)
    assert s.accounts.route("anything") is only


def test_a_worker_with_no_account_at_all_does_not_start() -> None:
    with pytest.raises(SettingsError, match="NETCORE_API_KEY is not set"):
        Settings.from_env({})


@pytest.mark.parametrize("text,words", [
    (GOOD.replace('"b-1"', '"a-1"'), "asset_id 'a-1' is in two accounts"),
    (GOOD.replace('region = "in"', 'region = "mars"'), "region 'mars' is not one of us, in, eu"),
    (GOOD.replace("BRAND_A_KEY", "NOT_SET_ANYWHERE"), "NOT_SET_ANYWHERE (api_key_env) is not set"),
    (GOOD.replace("{key_file}", "/nonexistent/key"), "cannot read api_key_file /nonexistent/key"),
    (GOOD.replace('api_key_env = "BRAND_A_KEY"', 'api_key = "in-the-file"'), "never write a key in this file"),
    (GOOD.replace('region = "in"', 'region = "in"\nregoin = "eu"'), "unknown key(s) ['regoin']"),
    (GOOD.replace('region = "in"', 'api_url = "https://x.example"\nregion = "in"'), "exactly one of region"),
    (GOOD.replace("[accounts.brand-a]", "[accounts.\"Brand A\"]"), "a name is 1-63 lowercase"),
    (GOOD.replace("brand-a", "default"), "'default' is the account of NETCORE_API_KEY"),
    (GOOD.replace('["a-1", "a-2"]', "[]"), "asset_ids must be a non-empty list"),
    (GOOD.replace('["a-1", "a-2"]', '["a-1", "a-1"]'), "listed twice"),
    ("[accounts.brand-a\n", "not valid TOML"),
    ("[brands.a]\nx = 1\n", "unknown top-level key(s) ['brands']"),
], ids=["asset-in-two", "unknown-region", "missing-env-key", "missing-key-file", "key-in-file", "typo",
        "region-and-url", "bad-name", "default-name", "no-assets", "asset-twice", "not-toml", "no-accounts"])
def test_every_mistake_stops_start_up_with_one_line_naming_it(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(tmp_path, text)
    message = str(info.value)
    assert words in message and "NETCORE_ACCOUNTS_FILE" in message and "\n" not in message
    assert "key-a" not in message and "key-b" not in message


def test_an_empty_key_file_is_a_missing_key(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("  \n")
    with pytest.raises(SettingsError, match="is empty"):
        settings(tmp_path, GOOD.replace("{key_file}", str(empty)))


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read it"):
        Settings.from_env({"NETCORE_ACCOUNTS_FILE": str(tmp_path / "nope.toml"), "NETCORE_API_KEY": "k"})
