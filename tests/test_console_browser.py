"""The console in a real browser: Debian's Chromium, headless, driven by Playwright.

The server is filled with real payloads sent by ``telemetry`` clients over
loopback (``_fleet.send_fleet``). Every page must load with no console error,
no failed request and no blocked script or style (the Content-Security-Policy
would say so in the console); its numbers must be the JSON API's; its charts
must have a mark per bucket or value. With ``CONSOLE_SCREENSHOTS`` set to a folder,
screenshots of every page are written there for people to look at (they take a few
seconds, and assert nothing, so they are not taken otherwise).

Signed-in tests open a page (a tab) in one reader's context, signed in once; the
sign-in itself, and signing out, are tested with a context of their own.

The browser is ``/usr/bin/chromium`` (the README's test command installs it);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import quote

import pytest
from _fleet import (
    ADMIN_TOKEN,
    HOSTILE_KEY,
    HOSTILE_TEXT,
    READ_TOKEN,
    Fleet,
    RunningServer,
    clean_client_environment,
    expected_bars,
    running_server,
    send_fleet,
)
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright
from playwright.sync_api import Request as BrowserRequest
from playwright.sync_api import Response as BrowserResponse

import telemetry
from server_stub._svg import format_number

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = (
    Path(os.environ["CONSOLE_SCREENSHOTS"]).resolve() if os.environ.get("CONSOLE_SCREENSHOTS")
    else None
)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[RunningServer, Fleet]]:
    with clean_client_environment(), running_server() as server:
        fleet = send_fleet(server.url, tmp_path_factory.mktemp("fleet"))
        yield server, fleet


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        print(f"\nconsole screenshots: {SCREENSHOTS}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Watch:
    """Everything a page did that a clean page does not: console errors, failures, dialogs."""

    problems: List[str] = field(default_factory=list)
    dialogs: List[str] = field(default_factory=list)
    expected_statuses: Dict[str, int] = field(default_factory=dict)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)

    def _expected(self, url: str, status: int) -> bool:
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1]
        return self.expected_statuses.get(path) == status

    def _console(self, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning"):
            return
        # Chromium reports each error status in the console; those a test asked for are fine.
        status = re.search(r"Failed to load resource: .* status of (\d+)", message.text)
        if status and self._expected(message.location.get("url", ""), int(status.group(1))):
            return
        self.problems.append(f"console {message.type}: {message.text}")

    def _failed(self, request: BrowserRequest) -> None:
        if request.url.endswith("/favicon.svg") and request.failure == "net::ERR_ABORTED":
            return  # fetched lazily, and cancelled when the test moves on first
        self.problems.append(f"request failed: {request.url} {request.failure}")

    def _response(self, response: BrowserResponse) -> None:
        if response.status >= 400 and not self._expected(response.url, response.status):
            self.problems.append(f"{response.status} for {response.url}")

    def check(self) -> None:
        assert self.problems == []
        assert self.dialogs == []


def new_page(
    browser: Browser, viewport: Dict[str, int] = DESKTOP
) -> Tuple[BrowserContext, Page, Watch]:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    watch = Watch()
    watch.attach(page)
    return context, page, watch


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/")


def shoot(page: Page, name: str) -> None:
    if SCREENSHOTS is not None:
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def reader(
    browser: Browser, fleet_server: Tuple[RunningServer, Fleet]
) -> Iterator[BrowserContext]:
    """A browser context signed in with the read token (its session cookie), for the module."""
    server, _ = fleet_server
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    page = context.new_page()
    watch = Watch()
    watch.attach(page)
    sign_in(page, server.url, READ_TOKEN)
    watch.check()
    page.close()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def reader_page(reader: BrowserContext) -> Iterator[Tuple[Page, Watch]]:
    """A new page of the signed-in reader, watched; closed after the test."""
    page = reader.new_page()
    watch = Watch()
    watch.attach(page)
    try:
        yield page, watch
    finally:
        page.close()


def window_of(page: Page) -> Dict[str, str]:
    """The window the page shows, as ``since``/``until`` query parameters."""
    since, until = (
        el.get_attribute("datetime") or "" for el in page.locator(".window-note time").all()
    )
    return {"since": since, "until": until}


def table_rows(page: Page, heading: str) -> List[List[str]]:
    """The cells (header cell first) of the table in the panel titled ``heading``."""
    panel = page.locator("section.panel", has=page.get_by_role("heading", name=heading, exact=True))
    rows = panel.locator("table tbody tr")
    return [
        [cell.strip() for cell in row.locator("th, td").all_inner_texts()] for row in rows.all()
    ]


def marks(page: Page, heading: str, kind: str = "bar") -> int:
    panel = page.locator("section.panel", has=page.get_by_role("heading", name=heading, exact=True))
    return panel.locator(f"svg.chart .{kind}").count()


def pages_of(fleet: Fleet) -> List[Tuple[str, str]]:
    return [
        ("overview", "/"),
        ("overview-7-days", "/?days=7"),
        ("overview-90-days", "/?days=90"),
        ("keys", "/keys"),
        ("key-requests", "/key?name=requests"),
        ("key-version", "/key?name=version"),
        ("key-features", "/key?name=features"),
        ("key-hostile", f"/key?name={quote(HOSTILE_KEY)}"),
        ("events", "/events"),
        ("instance", f"/instance/{fleet.instance_ids[0]}"),
        ("policy", "/policy"),
    ]


def test_every_page_loads_cleanly_on_a_desktop_and_a_phone(
    browser: Browser, fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, fleet = fleet_server
    phone_pages = {"overview", "key-features", "events", "instance", "policy"}
    context, page, watch = new_page(browser)
    sign_in(page, server.url, ADMIN_TOKEN)
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)  # type: ignore[arg-type]
        for name, path in pages_of(fleet):
            if size == "phone" and name not in phone_pages:
                continue
            response = page.goto(f"{server.url}{path}")
            assert response is not None and response.status == 200, path
            assert "default-src 'self'" in response.headers["content-security-policy"]
            assert page.locator("main h1").count() == 1
            # Nothing wider than the screen: no sideways scrolling on a phone.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], (path, width)
            shoot(page, f"{size}-{name}")
    watch.check()
    context.close()


def test_the_numbers_shown_are_the_json_apis(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, fleet = fleet_server
    page, watch = reader_page
    page.goto(f"{server.url}/")  # signed in as a reader
    window = window_of(page)
    stats = server.api("/v1/stats", **window)
    assert stats["payloads"] == fleet.payloads and stats["instances"] == len(fleet.instance_ids)
    figures = dict(
        zip(
            page.locator(".headline dt").all_inner_texts(),
            page.locator(".headline .figure").all_inner_texts(),
        )
    )
    assert figures["Active instances"] == format_number(stats["instances"])
    assert figures["Payloads"] == format_number(stats["payloads"])
    assert figures["Dropped items"] == format_number(stats["dropped"])
    active = server.api("/v1/active", bucket="day", **window)["points"]
    for heading, name in (
        ("Active instances per day", "instances"),
        ("Payloads per day", "payloads"),
        ("Dropped items per day", "dropped"),
    ):
        shown = table_rows(page, heading)  # newest first
        assert shown == [[p["t"][:10], format_number(p[name])] for p in reversed(active)]
    assert sum(1 for p in active if p["payloads"]) == fleet.days
    assert stats["dropped"] == sum(p["dropped"] for p in active) == fleet.dropped > 0

    page.goto(f"{server.url}/key?name=requests")
    series = server.api("/v1/series", key="requests", bucket="day", **window)["points"]
    assert table_rows(page, "Total per day") == [
        [p["t"][:10], format_number(p["value"])] for p in reversed(series)
    ]
    assert table_rows(page, "Instances reporting per day") == [
        [p["t"][:10], format_number(p["instances"])] for p in reversed(series)
    ]
    assert (
        sum(p["value"] for p in series) == sum(range(1, len(fleet.instance_ids) + 1)) * fleet.days
    )

    page.goto(f"{server.url}/key?name=features")
    breakdown = server.api("/v1/breakdown", key="features", limit=20, **window)
    assert breakdown["kind"] == "counting_set"
    assert table_rows(page, "Top values by count") == [
        [v["value"], format_number(v["count"]), format_number(v["instances"])]
        for v in breakdown["values"]
    ]
    page.goto(f"{server.url}/key?name=version")
    breakdown = server.api("/v1/breakdown", key="version", limit=20, **window)
    assert table_rows(page, "Latest value per instance") == [
        [v["value"], format_number(v["instances"])] for v in breakdown["values"]
    ]
    watch.check()


def test_charts_have_a_mark_per_bucket_and_value(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, _ = fleet_server
    page, watch = reader_page
    page.goto(f"{server.url}/")  # signed in as a reader
    for days in (7, 30, 90):
        page.goto(f"{server.url}/?days={days}")
        for heading in ("Active instances per day", "Payloads per day", "Dropped items per day"):
            assert marks(page, heading) == days, (heading, days)
    stats = server.api("/v1/stats", **window_of(page))
    assert marks(page, "Top keys by count") == expected_bars(stats)
    page.goto(f"{server.url}/key?name=requests&days=7")
    assert marks(page, "Total per day") == 7
    assert marks(page, "Instances reporting per day", "point") == 7
    page.goto(f"{server.url}/key?name=features&days=7")
    breakdown = server.api("/v1/breakdown", key="features", limit=20, **window_of(page))
    assert marks(page, "Top values by count") == len(breakdown["values"]) == 2
    # The optional script adds tooltips; the charts read the same without it.
    page.locator("svg.chart .bar").first.hover()
    assert page.locator(".tooltip").inner_text() == "tls: " + format_number(
        breakdown["values"][0]["count"]
    )
    watch.check()


def test_signing_in_is_required_and_the_session_cookie_is_strict(
    browser: Browser, fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, _ = fleet_server
    context, page, watch = new_page(browser)
    watch.expected_statuses.update({"/": 401, "/login": 401})  # signed out; a wrong token
    response = page.goto(f"{server.url}/")
    assert response is not None and response.status == 401
    assert page.get_by_label("Token").is_visible()
    assert page.locator(".headline, table, svg.chart").count() == 0
    assert "requests" not in page.content()
    shoot(page, "desktop-sign-in")
    page.get_by_label("Token").fill("not-the-token")
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    assert page.locator("#token-error").inner_text() == "That token is not valid here."
    assert page.get_by_label("Token").get_attribute("aria-invalid") == "true"
    assert context.cookies() == []
    page.get_by_label("Token").fill(READ_TOKEN)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/")
    (cookie,) = context.cookies()
    assert cookie["name"] == "telemetry_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert READ_TOKEN not in cookie["value"] and ADMIN_TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # out of reach of scripts
    assert page.locator(".headline").count() == 5
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{server.url}/login")
    assert context.cookies() == []
    watch.expected_statuses["/keys"] = 401
    response = page.goto(f"{server.url}/keys")
    assert response is not None and response.status == 401
    watch.check()
    context.close()


def test_a_policy_edited_in_the_form_is_the_next_update_answer(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet], tmp_path: Path
) -> None:
    server, _ = fleet_server
    page, watch = reader_page
    watch.expected_statuses["/policy"] = 400
    page.goto(f"{server.url}/")  # signed in as a reader
    page.get_by_role("link", name="Policy").click()
    page.get_by_label("Disabled keys").fill("version\nfeatures")
    page.get_by_label("Seconds between check-ins").fill("soon")
    page.get_by_label("Admin token").fill(READ_TOKEN)
    page.get_by_role("button", name="Save the policy").click()
    page.wait_for_load_state()
    assert page.locator("#next_update-error").is_visible()
    assert page.get_by_label("Seconds between check-ins").get_attribute("aria-invalid") == "true"
    page.get_by_label("Seconds between check-ins").fill("600")
    page.get_by_label("Admin token").fill(READ_TOKEN)
    page.get_by_role("button", name="Save the policy").click()
    page.wait_for_load_state()
    assert page.locator("#admin_token-error").inner_text() == "That is not the admin token."
    assert page.get_by_label("Disabled keys").input_value() == "version\nfeatures"
    shoot(page, "desktop-policy-error")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.keyboard.press("Enter")  # submits from the keyboard
    page.wait_for_url(re.compile(r".*/policy\?saved=1.*"))
    assert page.get_by_role("status").inner_text() == "The policy was saved."
    shoot(page, "desktop-policy-saved")

    with clean_client_environment():
        client = telemetry.Client()
        client.init(
            uuid.uuid4(), app="steered", endpoint=server.url, consent=True, state_dir=tmp_path
        )
        client.start_emitting()
        try:
            client.increment("requests")
            assert client.flush(10.0)
            assert client.status().server_disabled_keys == frozenset({"version", "features"})
        finally:
            client.stop_emitting()
    assert server.api("/v1/policy")["next_update"] == 600
    watch.check()


def assert_nothing_ran(page: Page, url: str, paths: List[str]) -> None:
    """No element or script came out of a client's string on these pages."""
    for path in paths:
        page.goto(f"{url}{path}")
        assert page.locator("img").count() == 0, path
        scripts = page.locator("script")
        assert scripts.count() == 1 and scripts.get_attribute("src") == "/static/console.js"


def test_a_hostile_key_is_text_and_runs_nothing(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, fleet = fleet_server
    page, watch = reader_page
    page.goto(f"{server.url}/")  # signed in as a reader
    page.goto(f"{server.url}/keys")
    link = page.get_by_role("link", name=HOSTILE_KEY, exact=True)
    assert link.is_visible()
    link.click()
    page.wait_for_load_state()
    assert page.locator("main h1").inner_text() == f"Key {HOSTILE_KEY}"
    page.goto(f"{server.url}/instance/{fleet.instance_ids[0]}")
    assert HOSTILE_KEY in page.locator(".payload-data").first.inner_text()
    paths = ["/", "/keys", f"/key?name={quote(HOSTILE_KEY)}", f"/instance/{fleet.instance_ids[0]}"]
    assert_nothing_ran(page, server.url, paths)
    watch.check()  # no alert() dialog ever opened


def test_events_are_counted_as_the_api_says_and_their_attributes_run_nothing(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, fleet = fleet_server
    page, watch = reader_page
    page.goto(f"{server.url}/")  # signed in as a reader
    page.goto(f"{server.url}/events")
    counts = server.api("/v1/stats", **window_of(page))["events"]
    assert counts == {"behavioral": {"click": fleet.days}}
    assert table_rows(page, "Events by type and name") == [["behavioral", "click", str(fleet.days)]]
    assert marks(page, "Events by type and name") == 1
    assert page.get_by_text(HOSTILE_TEXT, exact=True).count() == fleet.days
    shoot(page, "desktop-events-hostile")
    page.get_by_role("link", name="click", exact=True).click()
    page.wait_for_url(re.compile(r".*/events\?type=behavioral&name=click.*"))
    assert page.get_by_text(HOSTILE_TEXT, exact=True).count() == fleet.days
    assert_nothing_ran(page, server.url, ["/events", f"/instance/{fleet.instance_ids[0]}"])
    watch.check()  # no alert() dialog ever opened


def test_the_keyboard_reaches_everything(
    reader_page: Tuple[Page, Watch], fleet_server: Tuple[RunningServer, Fleet]
) -> None:
    server, _ = fleet_server
    page, watch = reader_page
    page.goto(f"{server.url}/")  # signed in as a reader
    focused: List[str] = []
    for _ in range(10):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert focused == [
        "Skip to content",
        "telemetry console",
        "Overview",
        "Keys",
        "Events",
        "Policy",
        "7 days",
        "30 days",
        "90 days",
        "Sign out",
    ]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")  # on "90 days"
    page.wait_for_url(re.compile(r".*days=90$"))
    assert page.locator(".window [aria-current]").inner_text() == "90 days"
    # The skip link jumps over the navigation, to the page's own content.
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    assert page.evaluate("location.hash") == "#main"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('main') !== null")
    watch.check()
