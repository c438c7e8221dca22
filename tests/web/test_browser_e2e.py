"""A real browser (Debian's headless Chromium driven by Selenium) against ``callboard serve``.

Self-Care: sign in, read the code, screenshot the page, decode the QR from the screenshot
with ``zbarimg``, redeem those digits with the emulated phone, reload: the phone is active.
Admin: add a BAT phone, view its code, upload a CSV. No JavaScript is needed by any page.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon import certs
from e2e.phone_e2e_support import boot, mic_files
from support.harness import Daemon
from web.web_support import add_user

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "correct horse battery"
MAC = "00AABBCC0B01"

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which("zbarimg")):
    pytest.fail(
        "the browser tests need Debian's chromium, chromium-driver and zbar-tools "
        "(installed by .ci/run)",
        pytrace=False,
    )

from selenium import webdriver as selenium  # noqa: E402 - missing: the tests fail, not skip
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser
    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",  # the daemon's self-signed web certificate
        "--window-size=1200,1600",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    driver = selenium.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def web(daemon_factory: Any, lab: certs.LabCA, lab_dir: Path) -> Daemon:
    d: Daemon = daemon_factory("--web-port", "0", "--manufacturing-trust", str(lab_dir))
    add_user(d, "alice", PASSWORD, "--name", "Alice Example")
    add_user(d, "root1", PASSWORD, "--admin")
    return d


def sign_in(driver: Any, base: str, user: str, start: str = "/self-care/") -> None:
    driver.get(base + start)
    assert "/sign-in" in driver.current_url
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, 60).until(lambda d: "/sign-in" not in d.current_url)


def submit(driver: Any, button_id: str) -> None:
    """Click a form button and wait for the page it posts to.

    A click returns once the event is dispatched, not once the next document has loaded;
    looking up an element of the next page straight away races the navigation.
    """
    old_page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, 60).until(lambda _: _left(old_page))


def _left(element: Any) -> bool:
    """The browser has left ``element``'s document. Mid-navigation chromedriver may say so
    with "Node ... does not belong to the document" instead of a stale-element error, which
    Selenium's ``staleness_of`` lets through (it failed a CI run)."""
    try:
        element.is_enabled()
    except WebDriverException:  # stale, or the node's document is going away
        return True
    return False


def decode_qr(png: Path) -> list[str]:
    result = subprocess.run(
        ["zbarimg", "--quiet", "--raw", str(png)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_self_care_code_and_qr_onboard_the_phone(
    web: Daemon, browser: Any, lab: certs.LabCA, tmp_path: Path
) -> None:
    dev = web.json(
        "device", "add", "--model", "8841", "--user", "alice", "--line", "2101:Alice",
        "--password", "pw-2101", "--description", "Alice's desk phone",
    )  # fmt: skip
    bat = dev["name"]
    base = f"https://127.0.0.1:{web.port('web')}"
    sign_in(browser, base, "alice")
    assert browser.current_url.endswith("/self-care/")
    assert browser.find_element(By.ID, "signed-in-as").text == "Alice Example"
    shown = browser.find_element(By.ID, f"code-{bat}").text
    assert shown == dev["activation_code"]["code"]
    digits = shown.replace("-", "")

    shot = tmp_path / "self-care.png"
    assert browser.find_element(By.CSS_SELECTOR, f"#phone-{bat} figure.qr").screenshot(str(shot))
    browser.save_screenshot(str(tmp_path / "self-care-page.png"))
    assert decode_qr(shot) == [digits]
    assert decode_qr(tmp_path / "self-care-page.png") == [digits]

    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=MAC)
    result = boot(web, mic, model="8841", mac=MAC, extra=("--code", digits))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status 0 activated" in result.stdout

    browser.refresh()
    phone = browser.find_element(By.ID, f"phone-SEP{MAC}")
    assert phone.find_element(By.CSS_SELECTOR, ".state").get_attribute("data-state") == "active"
    page = browser.page_source
    assert shown not in page and "<svg" not in page and f"code-SEP{MAC}" not in page


def test_admin_adds_a_bat_phone_views_its_code_and_imports_a_csv(
    web: Daemon, browser: Any, tmp_path: Path
) -> None:
    base = f"https://127.0.0.1:{web.port('web')}"
    sign_in(browser, base, "root1", "/admin/devices")
    assert browser.current_url.endswith("/admin/devices")

    submit(browser, "add-device")
    browser.find_element(By.ID, "mac").clear()
    browser.find_element(By.ID, "description").send_keys("Lobby phone")
    browser.find_element(By.ID, "lines").send_keys("3001:Lobby")
    submit(browser, "create-device")
    name = browser.find_element(By.ID, "device-name").text
    assert name.startswith("BAT") and "Device added." in browser.page_source
    assert browser.find_element(By.ID, "device-state").text == "awaiting-activation"

    submit(browser, "view-code")
    code = browser.find_element(By.ID, "code").text
    assert code == web.json("code", "show", name)["code"]
    shot = tmp_path / "admin-code.png"
    browser.find_element(By.CSS_SELECTOR, "figure.qr").screenshot(str(shot))
    assert decode_qr(shot) == [code.replace("-", "")]

    csv = tmp_path / "phones.csv"
    csv.write_text(
        "mac,model,description,user,directory_number,display_name,requires_activation\n"
        "0011223344A1,8841,Room 1,alice,4001,Room 1,true\n"
        ",8851,Room 2,,4002,Room 2,\n"
    )
    browser.get(base + "/admin/import")
    browser.find_element(By.ID, "csv-file").send_keys(str(csv))
    browser.find_element(By.ID, "dummy-mac").click()
    submit(browser, "upload")
    assert "Imported 2 device(s)." in browser.find_element(By.ID, "notice").text
    names = {d["name"] for d in web.json("device", "list")}
    assert "SEP0011223344A1" in names and len(names) == 3

    browser.get(base + "/admin/devices?q=Room")
    rows = browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
    assert len(rows) == 2
