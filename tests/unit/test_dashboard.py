"""The dashboard app's files and headers, without Ray: what it serves, and that nothing on the page names
another origin (the browser test, ``tests/integration/test_dashboard.py``, checks what a browser loads)."""

from __future__ import annotations

import json
import re

import pytest

from apps.dashboard import HEADERS, static_files
from orch.config import ConfigError, DashboardConfig, load_args


def test_the_page_its_script_style_and_config_are_served() -> None:
    files = static_files(DashboardConfig(api_base="/private/acme/"))
    assert {"/", "/index.html", "/dashboard.js", "/dashboard.css", "/config.json"} <= set(files)
    assert files["/"] == files["/index.html"] and files["/"][1].startswith("text/html")
    assert json.loads(files["/config.json"][0]) == {"api_base": "/private/acme"}
    assert files["/dashboard.js"][1].startswith("text/javascript")


def test_no_file_names_another_origin_and_the_policy_forbids_one() -> None:
    for path, (body, _) in static_files(DashboardConfig()).items():
        urls = re.findall(rb"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body)
        assert urls in ([], [b"http://www.w3.org"]), (path, urls)  # the SVG namespace is a name, not a fetch
    policy = HEADERS["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy


@pytest.mark.parametrize("args", [{"api_base": "http://elsewhere"}, {"api_bsae": "/"}])
def test_bad_args_fail_in_one_line(args: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_args(DashboardConfig, args)
    assert "\n" not in str(err.value) and next(iter(args)) in str(err.value)
