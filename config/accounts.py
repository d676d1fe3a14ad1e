"""The Netcore accounts one worker fleet delivers to, and which asset_id belongs to which.

Without a file, there is one account, ``default``: ``NETCORE_API_KEY`` in ``NETCORE_REGION`` (or
at ``NETCORE_API_URL``), and every asset_id is its own. A team with several Netcore panels
(brands, regions: one API key and one data centre each) names a TOML file in
``NETCORE_ACCOUNTS_FILE``, read and checked once at start-up::

    [accounts.brand-a]
    api_key_env = "BRAND_A_NETCORE_KEY"     # the key is read from this environment variable,
    region = "in"                           # or api_key_file = "/run/secrets/brand-a"
    asset_ids = ["ab12cd34", "ef56ab78"]    # region us/in/eu, or api_url = "https://..."

    [accounts.brand-b]
    api_key_file = "/run/secrets/netcore-brand-b"
    api_url = "https://apieu2.netcoresmartech.com"
    asset_ids = ["0f1e2d3c"]

Keys are never written in the file itself (it is configuration, kept in version control; keys
are secrets). An asset_id of no account goes to ``default`` when ``NETCORE_API_KEY`` is set too,
otherwise it is dead-lettered ``unroutable`` (replayable once the file is fixed). Anything that
would make an event go to the wrong place stops start-up with one line naming it: an asset_id in
two accounts, an unknown region, a key that is missing or empty, an unknown key in a table.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.errors import SettingsError

#: The API's base URL for each Netcore data centre (``NETCORE_REGION``, an account's ``region``).
REGIONS: dict[str, str] = {
    "us": "https://api2.netcoresmartech.com",
    "in": "https://apiin2.netcoresmartech.com",
    "eu": "https://apieu2.netcoresmartech.com",
}

#: The path of the upload endpoint, appended to the base URL.
UPLOAD_PATH = "/v1/activity/upload"

#: The account of ``NETCORE_API_KEY``: a name the file may not use.
DEFAULT = "default"

#: An account's name: it names queues and metric labels, so lowercase letters, digits, - and _.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

#: The keys an account's table may hold.
ACCOUNT_KEYS = frozenset({"api_key_env", "api_key_file", "region", "api_url", "asset_ids"})


@dataclass(frozen=True)
class Account:
    """One Netcore account: where its uploads go, with which key, for which asset_ids."""

    name: str
    api_key: str = field(repr=False)
    #: The API's base URL: the region's, or the account's own ``api_url``.
    base_url: str = field(repr=False)
    #: The asset_ids the account owns (empty for ``default``: it takes the others).
    asset_ids: frozenset[str] = frozenset()
    #: The region named, when it was a region (for logs and tags: the URL may hold a secret).
    region: str = ""

    @property
    def upload_url(self) -> str:
        return self.base_url.rstrip("/") + UPLOAD_PATH

    @property
    def where(self) -> str:
        """Where it uploads, safe for logs: the region, or the URL's host."""
        return f"region {self.region}" if self.region else (urlsplit(self.base_url).hostname or "a custom URL")


@dataclass(frozen=True)
class Accounts:
    """Every account of the worker, and the rule that routes an asset_id to one."""

    #: ``default`` first when there is one, then the file's in the file's order.
    all: tuple[Account, ...]
    default: Account | None = None
    _owners: Mapping[str, Account] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, accounts: list[Account], default: Account | None) -> Accounts:
        owners: dict[str, Account] = {}
        for account in accounts:
            for asset_id in account.asset_ids:
                other = owners.setdefault(asset_id, account)
                if other is not account:
                    raise SettingsError(f"NETCORE_ACCOUNTS_FILE: asset_id {asset_id!r} is in two accounts, "
                                        f"{other.name!r} and {account.name!r}: an asset_id belongs to one account")
        return cls(tuple(([default] if default else []) + accounts), default, owners)

    def route(self, asset_id: str) -> Account | None:
        """The account of ``asset_id``: its owner, else ``default``, else None (unroutable)."""
        return self._owners.get(asset_id, self.default)

    def named(self, name: str) -> Account | None:
        for account in self.all:
            if account.name == name:
                return account
        return None

    @property
    def names(self) -> list[str]:
        return [account.name for account in self.all]

    def __iter__(self) -> Iterator[Account]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)


def base_url(*, region: str, api_url: str, where: str) -> str:
    """The base URL of ``api_url`` if given, else of ``region``; ``where`` names the setting."""
    if api_url:
        if urlsplit(api_url).scheme not in ("http", "https") or not urlsplit(api_url).hostname:
            raise SettingsError(f"{where}: api_url must be an http:// or https:// URL")
        return api_url
    if region not in REGIONS:
        raise SettingsError(f"{where}: region {region!r} is not one of {', '.join(REGIONS)}")
    return REGIONS[region]


def load(path: str, env: Mapping[str, str] | None = None) -> list[Account]:
    """The accounts of the TOML file at ``path`` (see the module docstring), checked."""
    env = os.environ if env is None else env
    where = f"NETCORE_ACCOUNTS_FILE={path}"
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: not valid TOML ({exc})") from None
    unknown = set(data) - {"accounts"}
    if unknown:
        raise SettingsError(f"{where}: unknown top-level key(s) {sorted(unknown)}; accounts go in [accounts.NAME] tables")
    tables = data.get("accounts")
    if not isinstance(tables, dict) or not tables:
        raise SettingsError(f"{where}: no [accounts.NAME] table")
    return [_account(name, table, env, where) for name, table in tables.items()]


def _account(name: str, table: Any, env: Mapping[str, str], where: str) -> Account:
    where = f"{where}: account {name!r}"
    if not NAME.fullmatch(name):
        raise SettingsError(f"{where}: a name is 1-63 lowercase letters, digits, '-' or '_', starting with a letter "
                            "or digit")
    if name == DEFAULT:
        raise SettingsError(f"{where}: '{DEFAULT}' is the account of NETCORE_API_KEY; give this one another name")
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: must be a table ([accounts.{name}])")
    if "api_key" in table:
        raise SettingsError(f"{where}: never write a key in this file; name it with api_key_env (an environment "
                            "variable) or api_key_file (a file holding it)")
    unknown = set(table) - ACCOUNT_KEYS
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ACCOUNT_KEYS)}")
    region, api_url = table.get("region", ""), table.get("api_url", "")
    if not isinstance(region, str) or not isinstance(api_url, str) or bool(region) == bool(api_url):
        raise SettingsError(f"{where}: give exactly one of region (us, in, eu) or api_url")
    asset_ids = table.get("asset_ids")
    if (not isinstance(asset_ids, list) or not asset_ids
            or not all(isinstance(a, str) and a.strip() for a in asset_ids)):
        raise SettingsError(f"{where}: asset_ids must be a non-empty list of asset_id strings")
    if len(set(asset_ids)) != len(asset_ids):
        raise SettingsError(f"{where}: an asset_id is listed twice in asset_ids")
    return Account(name=name, api_key=_key(table, env, where), base_url=base_url(region=region, api_url=api_url,
                                                                               where=where),
                   asset_ids=frozenset(asset_ids), region=region)


def _key(table: dict[str, Any], env: Mapping[str, str], where: str) -> str:
    variable, file = table.get("api_key_env"), table.get("api_key_file")
    if (variable is None) == (file is None):
        raise SettingsError(f"{where}: give exactly one of api_key_env or api_key_file")
    if variable is not None:
        if not isinstance(variable, str) or not variable:
            raise SettingsError(f"{where}: api_key_env must name an environment variable")
        key = env.get(variable, "").strip()
        if not key:
            raise SettingsError(f"{where}: the environment variable {variable} (api_key_env) is not set or empty")
        return key
    if not isinstance(file, str) or not file:
        raise SettingsError(f"{where}: api_key_file must name a file")
    try:
        key = Path(file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read api_key_file {file} ({exc.strerror or exc})") from None
    if not key:
        raise SettingsError(f"{where}: api_key_file {file} is empty")
    return key
