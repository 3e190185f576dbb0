"""The web page in a real headless Chromium (Debian's `chromium`, driven by
Selenium through `chromedriver`) against a real `ringtail serve --http`.

Every wait is an explicit WebDriverWait on a DOM condition (rows present,
a status text), never a sleep. Each test saves a screenshot in its tmp dir
(`page.png`); docs/web-page.png is one of them (see `test_records_...`).
Chromium and chromedriver come from `make test-tools` (apt); without them
the tests fail saying so, they never skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import trio

from ringtail.ioring.record import SlotRecord
from ringtail.service.client import Client
from tests.service.conftest import DaemonProcess, RecordFactory, short_socket_dir, write_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Chromium's arguments that work here as root (../shared/notes/browser-tests.md):
# without the background-networking ones it keeps calling hosts this network refuses.
CHROMIUM_ARGUMENTS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                      "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync",
                      "--disable-dev-shm-usage", "--window-size=1400,900")
# Seconds an explicit wait may take before the test fails (a hang guard: the
# conditions are met in well under a second on an idle machine).
WAIT_S = 30.0
# Seconds between two checks of a wait's condition (Selenium's default is 0.5 s,
# which each wait may add after its condition holds; a check is one WebDriver
# round trip of a few milliseconds).
WAIT_POLL_S = 0.05
TOKEN_A, TOKEN_B = "rt_browser_reader_a", "rt_browser_reader_b"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web-page.png"



def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


CONFIG = f"""
    create_tenants = true
    [tenants.7]
    name = "trainer"
    capacity = 4096
    grants = [{{ token = "{token_hash(TOKEN_A)}", roles = ["subscribe"] }}]
    [tenants.8]
    name = "other-team"
    capacity = 4096
    grants = [{{ token = "{token_hash(TOKEN_B)}", roles = ["subscribe"] }}]
"""


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module (starting one takes seconds); fails
    (never skips) without chromium, chromedriver or selenium."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: run `make test-tools` (installs "
                    "Debian's chromium and chromium-driver with apt-get)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium):
    """The module's Chromium, on a blank page. Each test's daemon listens on its own
    port, so its page is another origin: nothing of an earlier test's page (the
    token in sessionStorage, its event streams) is seen. After the test the tab
    goes back to a blank page, which ends that page's scripts and streams."""
    chromium.get("about:blank")
    try:
        yield chromium
    finally:
        chromium.get("about:blank")


def free_port() -> int:
    # The daemon is restarted on the same port in one test, so it is picked
    # here rather than with port 0.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def web_daemon(tmp_path):
    config = write_config(tmp_path, CONFIG)
    process = DaemonProcess(os.fspath(tmp_path / "data"),
                            os.path.join(short_socket_dir(tmp_path), "web.sock"),
                            {"config": config, "http": f"127.0.0.1:{free_port()}",
                             "io": "threads"}, cwd=os.fspath(tmp_path))
    process.start()
    process.url = process.run_stderr.split("metrics listening on ", 1)[1].split()[0]
    yield process
    process.close()
    print(f"ringtail serve's stderr:\n{process.stderr}")  # shown when the test failed


def publish(process: DaemonProcess, tenant_id: int, records: list[SlotRecord]) -> list[int]:
    """Publish one batch over the Unix socket; the acknowledged sequences."""
    async def run():
        async with await Client.connect(process.socket_path, tenant_id) as client:
            return await client.publish(b"".join(record.encode() for record in records))
    ack = trio.run(run)
    return list(range(ack.first_sequence, ack.last_sequence + 1))


def wait(driver, condition, message: str):
    """Until `condition(driver)` holds. A row the page replaced between finding
    it and reading it (it trims to WEB_ROWS_KEPT_MAX rows as records arrive)
    is a stale element: the condition is simply checked again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT_S, poll_frequency=WAIT_POLL_S,
                         ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message)


def status_is(text: str):
    def condition(driver):
        return driver.find_element("id", "status").text == text
    return condition


def record_rows(driver) -> list:
    return driver.find_elements("css selector", "#records tbody tr.record")


def row_count_is(count: int):
    def condition(driver):
        return len(record_rows(driver)) == count
    return condition


def enter_token(driver, token: str) -> None:
    field = driver.find_element("id", "token")
    field.clear()
    field.send_keys(token)
    driver.find_element("id", "token-save").click()


def open_tail(driver, url: str, tenant_id: int, token: str) -> None:
    driver.get(f"{url}/tenants/{tenant_id}")
    enter_token(driver, token)
    wait(driver, status_is("live"), "the tail never went live")


def screenshot(driver, tmp_path: Path) -> Path:
    path = tmp_path / "page.png"
    assert driver.save_screenshot(os.fspath(path)), "no screenshot"
    assert path.stat().st_size > 0
    return path


def cells(row) -> list[str]:
    return [cell.text for cell in row.find_elements("tag name", "td")]


# -- the tests ----------------------------------------------------------------------------


def test_records_published_after_the_page_opened_appear_in_order_failures_highlighted(
        browser, web_daemon, tmp_path):
    factory = RecordFactory(7, seed=11)
    history = [factory.slot_record(slot_status=0, failure_class=0, backend_code=0,
                                   output_digest=0) for _ in range(5)]
    publish(web_daemon, 7, history)
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(5), "the history did not show")
    # Published after the page opened: plain records and two failures.
    live = [factory.slot_record(slot_status=0, failure_class=0, backend_code=0, output_digest=0)
            for _ in range(20)]
    live[4] = factory.slot_record(slot_status=3, failure_class=1, backend_code=9)
    live[13] = factory.slot_record(slot_status=2, failure_class=3, backend_code=77,
                                   output_digest=0x1122334455667788)
    sequences = publish(web_daemon, 7, live)
    assert sequences == list(range(5, 25))
    wait(browser, row_count_is(25), "live records did not all appear")
    rows = record_rows(browser)
    assert [int(row.get_attribute("data-seq")) for row in rows] == list(range(25))
    highlighted = {int(row.get_attribute("data-seq")): row for row in rows
                   if "failure" in row.get_attribute("class").split()}
    assert sorted(highlighted) == [9, 18]
    first, second = cells(highlighted[9]), cells(highlighted[18])
    assert (first[7], first[8]) == ("device_loss", "code 9")
    assert (second[7], second[8], second[9]) == ("program_bug", "code 77", "1122334455667788")
    # The opcode column is what was published, in order.
    assert [int(cells(row)[3]) for row in rows] == [r.opcode for r in history + live]
    # The list page: tenant 7 with its next sequence and the two failures seen.
    browser.get(f"{web_daemon.url}/")  # the token stays in this tab's sessionStorage
    wait(browser, lambda d: d.find_elements("css selector", 'tr[data-tenant="7"] td.next')
         and d.find_element("css selector", 'tr[data-tenant="7"] td.next').text == "25",
         "the tenant list did not show tenant 7")
    row = browser.find_element("css selector", 'tr[data-tenant="7"]')
    assert cells(row)[1] == "trainer" and cells(row)[8] == "2"
    path = screenshot(browser, tmp_path)
    # The tail view is the one in the docs: reopen it and save it there too.
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(25), "the tail did not reload")
    if os.environ.get("RINGTAIL_WRITE_DOCS_SCREENSHOT"):
        DOCS_SCREENSHOT.write_bytes(screenshot(browser, tmp_path).read_bytes())
    assert path.exists()


def test_a_filter_hides_what_it_should(browser, web_daemon, tmp_path):
    factory = RecordFactory(7, seed=12)
    records = [factory.slot_record(opcode=i % 4, epoch=i // 8) for i in range(32)]
    publish(web_daemon, 7, records)
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(32), "the history did not show")
    browser.find_element("id", "filter-opcodes").send_keys("2,3")
    browser.find_element("id", "filter-epoch-min").send_keys("1")
    browser.find_element("id", "filter-epoch-max").send_keys("2")
    browser.find_element("id", "filter-apply").click()
    expected = [i for i, r in enumerate(records) if r.opcode in (2, 3) and 1 <= r.epoch <= 2]
    wait(browser, row_count_is(len(expected)), "the opcode/epoch filter was not applied")
    assert [int(r.get_attribute("data-seq")) for r in record_rows(browser)] == expected
    # Live records pass through the same filter (applied by the daemon).
    more = [factory.slot_record(opcode=op, epoch=2) for op in (0, 2, 1, 3)]
    publish(web_daemon, 7, more)
    wait(browser, row_count_is(len(expected) + 2), "live filtered records did not appear")
    assert [int(r.get_attribute("data-seq")) for r in record_rows(browser)] == expected + [33, 35]
    # Failures only.
    for field in ("filter-opcodes", "filter-epoch-min", "filter-epoch-max"):
        browser.find_element("id", field).clear()
    browser.find_element("id", "filter-failure-only").click()
    browser.find_element("id", "filter-apply").click()
    failures = [i for i, r in enumerate(records + more) if r.has_failure_evidence]
    wait(browser, row_count_is(len(failures)), "the failure-only filter was not applied")
    rows = record_rows(browser)
    assert [int(r.get_attribute("data-seq")) for r in rows] == failures
    assert all("failure" in r.get_attribute("class").split() for r in rows)
    screenshot(browser, tmp_path)


def test_a_tenant_the_token_may_not_read_is_not_listed_and_its_url_is_refused(
        browser, web_daemon, tmp_path):
    publish(web_daemon, 7, [RecordFactory(7).slot_record()])
    publish(web_daemon, 8, [RecordFactory(8).slot_record()])
    browser.get(f"{web_daemon.url}/")
    enter_token(browser, TOKEN_A)
    wait(browser, lambda d: d.find_elements("css selector", 'tr[data-tenant="7"]'),
         "tenant 7 was not listed")
    assert browser.find_elements("css selector", 'tr[data-tenant="8"]') == []
    assert len(browser.find_elements("css selector", "#tenants tbody tr")) == 1
    browser.get(f"{web_daemon.url}/tenants/8")
    wait(browser, status_is("refused"), "tenant 8's tail was not refused")
    message = browser.find_element("id", "message").text
    assert message.startswith("refused (403)") and "tenant 8" in message
    assert record_rows(browser) == []
    # The other token sees tenant 8 (and not 7): the refusal is the token's.
    browser.get(f"{web_daemon.url}/")
    enter_token(browser, TOKEN_B)
    wait(browser, lambda d: d.find_elements("css selector", 'tr[data-tenant="8"]'),
         "tenant 8 was not listed for its own token")
    assert browser.find_elements("css selector", 'tr[data-tenant="7"]') == []
    screenshot(browser, tmp_path)


def test_the_page_survives_a_daemon_restart_without_duplicates(browser, web_daemon, tmp_path):
    factory = RecordFactory(7, seed=13)
    publish(web_daemon, 7, [factory.slot_record() for _ in range(10)])
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(10), "the history did not show")
    status = web_daemon.stop()
    assert status == 0, web_daemon.stderr
    wait(browser, lambda d: d.find_element("id", "status").text.startswith("reconnecting"),
         "the page did not notice the daemon going")
    web_daemon.start()
    wait(browser, status_is("live"), "the page did not reconnect")
    sequences = publish(web_daemon, 7, [factory.slot_record() for _ in range(10)])
    assert sequences == list(range(10, 20))
    wait(browser, row_count_is(20), "records after the restart did not appear")
    seen = [int(row.get_attribute("data-seq")) for row in record_rows(browser)]
    assert seen == list(range(20))  # in order, none twice, none missing
    screenshot(browser, tmp_path)


def sparkline_peak(driver, tenant_id: int) -> float:
    """The highest point of a tenant's sparkline, 0..1 of its height (0: all zero)."""
    points = driver.find_element(
        "css selector", f'tr[data-tenant="{tenant_id}"] svg.spark polyline').get_attribute("points")
    heights = [float(point.split(",")[1]) for point in points.split()]
    return (22 - 1 - min(heights)) / (22 - 2)


def test_records_per_second_and_a_gap_after_pause_and_eviction(browser, web_daemon, tmp_path):
    from ringtail.service.web import WEB_ROWS_KEPT_MAX
    factory = RecordFactory(7, seed=14)
    publish(web_daemon, 7, [factory.slot_record() for _ in range(3)])
    browser.get(f"{web_daemon.url}/")
    enter_token(browser, TOKEN_A)
    spark = 'tr[data-tenant="7"] svg.spark polyline'
    wait(browser, lambda d: d.find_elements("css selector", spark),
         "tenant 7's sparkline was not drawn")
    assert sparkline_peak(browser, 7) == 0  # nothing published while watched
    publish(web_daemon, 7, [factory.slot_record() for _ in range(500)])
    wait(browser, lambda d: sparkline_peak(d, 7) > 0, "the records/s sparkline did not rise")
    # The tail: pause, let the ring (4,096) evict what the page has not read, resume.
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(500), "the history did not show")  # WEB_HISTORY_RECORD_COUNT_MAX
    last_shown = int(record_rows(browser)[-1].get_attribute("data-seq"))
    assert last_shown == 502
    browser.find_element("id", "pause").click()
    wait(browser, status_is("paused"), "the page did not pause")
    for _ in range(3):
        publish(web_daemon, 7, [factory.slot_record() for _ in range(2048)])
    browser.find_element("id", "pause").click()  # resume after sequence 502
    # The gap row scrolls out under the ring's 4,096 retained records (the page
    # keeps WEB_ROWS_KEPT_MAX rows); the counts line keeps the last gap.
    wait(browser, lambda d: "1 gaps" in d.find_element("id", "counts").text,
         "no gap after resuming past evicted records")
    counts = browser.find_element("id", "counts").text
    first, last = map(int, counts.split("(last: ")[1].split(" lost)")[0].split(".."))
    assert first == last_shown + 1 and last >= first
    # What follows the gap is the ring's oldest record on, in order, and the
    # page keeps at most WEB_ROWS_KEPT_MAX rows.
    wait(browser, lambda d: int(record_rows(d)[-1].get_attribute("data-seq")) == 503 + 3 * 2048 - 1,
         "records after the gap did not all arrive")
    rows = browser.find_elements("css selector", "#records tbody tr")
    assert len(rows) <= WEB_ROWS_KEPT_MAX
    sequences = [int(row.get_attribute("data-seq")) for row in record_rows(browser)]
    assert sequences == list(range(sequences[0], 503 + 3 * 2048))
    assert sequences[0] > last
    screenshot(browser, tmp_path)


def test_a_gap_is_shown_as_a_gap_row(browser, web_daemon, tmp_path):
    factory = RecordFactory(7, seed=15)  # opcodes 0..15
    publish(web_daemon, 7, [factory.slot_record() for _ in range(100)])
    open_tail(browser, web_daemon.url, 7, TOKEN_A)
    wait(browser, row_count_is(100), "the history did not show")
    # A filter nothing passes, so no record row pushes the gap row out.
    browser.find_element("id", "filter-opcodes").send_keys("99")
    browser.find_element("id", "filter-apply").click()
    wait(browser, row_count_is(0), "the filter was not applied")
    wait(browser, status_is("live"), "the filtered tail did not go live")
    browser.find_element("id", "pause").click()
    wait(browser, status_is("paused"), "the page did not pause")
    for _ in range(3):  # the ring holds 4,096: sequences below 6,144 + 100 - 4,096 go
        publish(web_daemon, 7, [factory.slot_record() for _ in range(2048)])
    browser.find_element("id", "pause").click()
    wait(browser, lambda d: d.find_elements("css selector", "#records tr.gap"),
         "no gap row after resuming past evicted records")
    gap = browser.find_element("css selector", "#records tr.gap")
    first, last = int(gap.get_attribute("data-gap-first")), int(gap.get_attribute("data-gap-last"))
    assert first == 0  # the filtered stream started at the ring's oldest (100 < 500 back)
    next_sequence = 100 + 3 * 2048
    assert next_sequence - 4096 <= last + 1 < next_sequence  # a ring retains at most its capacity
    assert gap.text.startswith(f"gap: {last - first + 1} records lost ({first}..{last})")
    assert record_rows(browser) == []
    screenshot(browser, tmp_path)
