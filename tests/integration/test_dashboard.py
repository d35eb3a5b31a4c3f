"""The dashboard in a real browser: Debian's headless Chromium, driven through its chromedriver by
Selenium, on the session's stack. A tenant signs in with a real key, sees the balance ``/v1/account``
returns, sends a request from the page and sees the balance drop by its cost and the request listed, and
the chart drawn; a wrong key shows an error. The admin key shows tenants, apps and GPUs, spend, and grants
credits. Screenshots go to ``test-artifacts/dashboard/`` (``$LLAMA_ORCH_ARTIFACTS`` elsewhere)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.integration.conftest import MODEL, Stack
from tests.integration.test_tap_billing import account, admin, new_tenant, usage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver
ARTIFACTS = Path(os.environ.get("LLAMA_ORCH_ARTIFACTS") or REPO / "test-artifacts") / "dashboard"
T = TypeVar("T")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("LLAMA_ORCH_REQUIRE_BROWSER"):  # CI installs them: a missing browser fails there
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="orch-chromium-")
    # The flags that keep Chromium off the (closed) network; a profile of its own.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1700", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, what: Callable[[Any], T], timeout_s: float = 60, why: str = "") -> T:
    from selenium.webdriver.support.ui import WebDriverWait

    result: T = WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(what, why or None)
    return result


def by_id(driver: Any, id_: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def sign_in(driver: Any, stack: Stack, key: str) -> None:
    driver.get(stack.base_url + "/dashboard")  # redirected to /dashboard/
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "1", why="the page's script ran")
    by_id(driver, "key").send_keys(key)
    by_id(driver, "sign-in").submit()


def refused_soon(stack: Stack, key: str, within_s: float = 15) -> bool:
    """Whether a revoked key is refused (401) within ``within_s``: every replica's key cache forgets it
    within its ttl (README: within 5 s)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        resp = httpx.get(stack.v1 + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        if resp.status_code == 401:
            return True
        time.sleep(0.25)
    return False


def shown_micro(driver: Any, id_: str) -> int:
    return int(by_id(driver, id_).get_attribute("data-micro") or -1)


def test_a_wrong_key_shows_an_error_not_a_blank_page(browser: Any, stack: Stack) -> None:
    sign_in(browser, stack, "sk-orch-aaaaaaaaaaaaaaaa-" + "b" * 43)
    error = wait(browser, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"), why="an error shown")
    assert "Sign-in failed" in error.text and "key" in error.text.lower(), error.text
    assert by_id(browser, "sign-in-view").is_displayed() and not by_id(browser, "tenant-view").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "wrong-key.png"))


def test_a_tenant_sees_its_balance_drop_by_a_requests_cost_and_the_request_listed(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.support.ui import Select

    tenant, key = new_tenant(stack, 5_000_000)
    before = account(stack, tenant)["balance_micro_credits"]
    sign_in(browser, stack, key)
    wait(browser, lambda d: by_id(d, "tenant-view").is_displayed(), why="the tenant's view")
    assert shown_micro(browser, "balance") == before == 5_000_000  # what /v1/account returns
    assert key not in browser.current_url and key not in browser.page_source  # memory only
    assert by_id(browser, "key").get_attribute("value") == ""

    # A request from the page; it waits until the request is listed, then refreshes from the API.
    Select(by_id(browser, "try-model")).select_by_value(MODEL)
    by_id(browser, "try-max").clear()
    by_id(browser, "try-max").send_keys("16")
    by_id(browser, "try").submit()  # the README's question, at temperature 0
    request_id = wait(browser, lambda d: by_id(d, "try-answer").get_attribute("data-request-id"), why="an answer")
    assert "Paris" in by_id(browser, "try-answer").text  # the page shows the right answer (golden, as in CI)
    row = f'#requests tr[data-request-id="{request_id}"]'
    wait(browser, lambda d: d.execute_script(f"return !!document.querySelector('{row}')"), why="the request listed")
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text

    # The balance dropped by exactly the request's cost once settled (the replica's lease returned).
    after = account(stack, tenant)
    cost = sum(r["cost_micro"] for r in usage(stack, tenant)["data"])
    assert cost > 0 and after["balance_micro_credits"] == before - cost and after["held_micro_credits"] == 0
    by_id(browser, "refresh").click()
    wait(browser, lambda d: shown_micro(d, "balance") == after["balance_micro_credits"], why="the settled balance")
    assert shown_micro(browser, "spent") == cost

    # The chart: a stacked bar of today's tokens, then of spend.
    bars = browser.execute_script(
        "return [...document.querySelectorAll('#chart svg rect.bar')].map(r => r.getBBox().height)"
    )
    assert bars and all(h > 0 for h in bars), bars
    browser.execute_script("document.querySelector('input[name=metric][value=cost]').click()")
    assert browser.execute_script("return document.querySelectorAll('#chart svg rect.bar').length") == len(bars)
    browser.save_screenshot(str(ARTIFACTS / "tenant.png"))

    # Keys: one made on the page works once, and not after it is revoked there.
    by_id(browser, "create-key").click()
    new_key = wait(browser, lambda d: by_id(d, "new-key").get_attribute("value"), why="the new key shown")
    assert new_key.startswith("sk-orch-")
    models = httpx.get(stack.v1 + "/models", headers={"Authorization": f"Bearer {new_key}"}, timeout=30)
    assert models.status_code == 200, models.text
    key_id = by_id(browser, "new-key").get_attribute("data-key-id")
    revoke = f'#keys tr[data-key-id="{key_id}"] button.revoke'
    wait(browser, lambda d: d.execute_script(f"return !!document.querySelector('{revoke}')"), why="the key listed")
    browser.execute_script(f"document.querySelector('{revoke}').click()")
    cell = f'#keys tr[data-key-id="{key_id}"] td:nth-child(4)'
    wait(browser, lambda d: d.execute_script(f"return document.querySelector('{cell}').textContent").startswith(
        "revoked"), why="the key revoked")  # fmt: skip
    assert refused_soon(stack, new_key)

    # Nothing came from anywhere but the stack (no CDN), and the console had no error.
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {stack.base_url}, origins
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not severe, severe


def test_the_admin_sees_tenants_apps_and_spend_and_grants_credits(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.support.ui import Select

    tenant, _ = new_tenant(stack, 1_000_000)
    sign_in(browser, stack, stack.admin_key)
    wait(browser, lambda d: by_id(d, "admin-view").is_displayed(), why="the admin's view")
    row = f'#tenants tr[data-tenant-id="{tenant}"] td.balance'
    micro = "return Number(document.querySelector(arguments[0]).dataset.micro)"
    wait(browser, lambda d: d.execute_script(f"return !!document.querySelector('{row}')"), why="the tenant listed")
    assert browser.execute_script(micro, row) == 1_000_000
    apps = browser.execute_script("return [...document.querySelectorAll('#apps tbody tr td:first-child')]"
                                  ".map(td => td.textContent)")  # fmt: skip
    assert {"public", "dashboard"} <= set(apps), apps
    assert browser.execute_script("return document.querySelectorAll('#nodes tbody tr').length") >= 1

    Select(by_id(browser, "grant-tenant")).select_by_value(tenant)
    by_id(browser, "grant-credits").clear()
    by_id(browser, "grant-credits").send_keys("2.5")
    by_id(browser, "grant").submit()
    wait(browser, lambda d: by_id(d, "notice").is_displayed(), why="the grant confirmed")
    assert "2.500000 credits" in by_id(browser, "notice").text
    wait(browser, lambda d: d.execute_script(micro, row) == 3_500_000, why="the new balance listed")
    assert account(stack, tenant)["balance_micro_credits"] == 3_500_000  # the ledger's, not the page's
    assert browser.execute_script("return document.querySelectorAll('#spend-chart svg rect.bar').length") >= 1
    browser.save_screenshot(str(ARTIFACTS / "admin.png"))


def test_a_tenant_lists_and_revokes_only_its_own_keys(stack: Stack) -> None:
    """The key routes the page uses, without a browser: another tenant's key is a 404, as if absent."""
    (_, key_a), (b, key_b) = new_tenant(stack, 0), new_tenant(stack, 0)

    def call(method: str, path: str, key: str) -> httpx.Response:
        return httpx.request(method, stack.v1 + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    id_b = key_b.removeprefix("sk-orch-").split("-")[0]
    listed = call("GET", "/keys", key_a).json()["data"]
    assert [k["key_id"] for k in listed] == [key_a.removeprefix("sk-orch-").split("-")[0]]
    assert all("hash" not in field and "secret" not in field for k in listed for field in k)
    refused = call("DELETE", f"/keys/{id_b}", key_a)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "key_not_found", refused.text
    assert call("GET", "/keys", key_b).status_code == 200  # b's key still works
    assert call("DELETE", f"/keys/{id_b}", key_b).json()["revoked"] is True  # its own
    assert refused_soon(stack, key_b)
    admin_listed = admin(stack, "GET", f"/admin/tenants/{b}/keys")["data"]
    assert [k["revoked_at"] is not None for k in admin_listed] == [True]
