"""Taking a run home in a real headless chromium on the bundled encoder: a short LoRA run trained
from the Train tab, its archive downloaded from there once it has finished (and not while it
trains, when Stop is the run's only button), the merged model and the Hub push explained in
place, and the same download in Compare: refused while the run trains, ready once it has finished.

Screenshots go to test-artifacts/ (or $LORA_ARENA_ARTIFACTS).
"""

from __future__ import annotations

import zipfile

import pytest
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

# The live test's markers (e2e, chromium needed) and how it starts and watches a run.
from test_browser_live import pytestmark, start_run, watch_status  # noqa: F401

playwright = pytest.importorskip("playwright.sync_api")


def download(page, button: str, folder) -> list[str]:
    """Click a download button, save what the browser receives, and list the archive's files."""
    playwright.expect(page.locator(button)).to_be_enabled(timeout=60_000)
    with page.expect_download() as started:
        page.locator(button).click()
    path = folder / started.value.suggested_filename
    started.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        return [path.name, *archive.namelist()]


def test_download_the_picked_run_from_the_train_tab_and_from_compare(shared_app_url, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900}, accept_downloads=True)
        page.set_default_timeout(60_000)
        page.goto(shared_app_url)
        page.get_by_text("Budget, precision, seed and evaluation").click()
        run_id = start_run(page, "LoRA: Freezes the model", steps=20, eval_steps=10, examples=32)

        # While the run trains there is nothing to take home, and the page says why.
        page.wait_for_function("() => document.querySelector('#export-note')?.innerText.includes('training')")
        assert page.locator("#download-button").is_disabled()
        playwright.expect(page.locator("#stop-button")).to_be_enabled()
        assert page.locator("#resume-button").is_disabled() and page.locator("#delete-button").is_disabled()

        # Compare lists it while it trains, with the reason it cannot be taken home yet. An overlay
        # emptied on purpose must stay empty when the tab is shown again.
        page.get_by_role("tab", name="Compare").click()
        for _ in range(120):  # listed once its worker has made the run (after the model loads)
            if run_id in page.locator("#leaderboard").inner_text():
                break
            page.get_by_role("button", name="Refresh", exact=True).click()
            page.wait_for_timeout(500)
        page.locator("#compare-take-home input").click()
        page.locator("ul[role=listbox] li", has_text=run_id).click()
        page.wait_for_function(
            "() => document.body.innerText.includes('still running (queued, training or evaluating)')"
        )
        assert page.locator("#compare-take-home-download").is_disabled()
        page.locator("#compare-runs .remove-all").click()
        playwright.expect(page.locator("#compare-runs .token")).to_have_count(0)
        page.get_by_role("tab", name="Train").click()
        watch_status(page, "Completed", timeout=300)
        # Finished: it can be deleted, not stopped or resumed.
        playwright.expect(page.locator("#stop-button")).to_be_disabled()
        playwright.expect(page.locator("#delete-button")).to_be_enabled()
        assert page.locator("#resume-button").is_disabled()

        names = download(page, "#download-button", tmp_path)
        assert names[0] == f"{run_id}.zip"
        assert {f"{run_id}/adapter_model.safetensors", f"{run_id}/README.md", f"{run_id}/run/summary.json"} <= set(
            names
        )
        assert page.locator("#export-note").inner_text().strip() == ""

        # The merged model applies to LoRA; offline, the push says why it cannot happen.
        page.get_by_text("Take it home: merged model and push to the Hub").click()
        playwright.expect(page.locator("#merge-button")).to_be_enabled()
        assert "merge_and_unload" in page.locator("#merge-note").inner_text()
        page.locator("#merge-button").click()
        assert download(page, "#merged-download", tmp_path)[0] == f"{run_id}-merged.zip"
        assert "cannot reach" in page.locator("#push-note").inner_text()
        assert page.locator("#push-button").is_disabled()
        page.screenshot(path=str(ARTIFACTS / "export-1-train-tab.png"), full_page=True)

        # Back in Compare, the run still picked there is now ready to take home (no change of pick needed),
        # and the emptied overlay is still empty.
        page.get_by_role("tab", name="Compare").click()
        assert download(page, "#compare-take-home-download", tmp_path)[0] == f"{run_id}.zip"
        assert page.locator("#compare-runs .token").count() == 0
        page.screenshot(path=str(ARTIFACTS / "export-2-compare.png"), full_page=True)
        browser.close()
