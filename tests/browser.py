"""The MLflow UI in a real browser: Debian's headless Chromium (`apt-get install chromium`), driven by Playwright
(no browser download). Used by the search test against a real `mlflow server`."""

from __future__ import annotations

import shutil
from pathlib import Path

# As root, with no network: no sandbox, and none of Chromium's background connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """The system's Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_search_in_ui(url: str, experiment_id: str, parent_name: str, model_name: str, winner_run_id: str,
                       shots: Path) -> None:
    """What a user does after a search: open the experiment from the link fitrun printed, find the parent run
    with its winner in the name, expand it to its children, open the frontier image, and open the registered
    model's version, linked to the winner's run. A screenshot of each step goes to `shots`."""
    from playwright.sync_api import expect, sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            parent = page.get_by_text(parent_name, exact=True)
            expect(parent).to_be_visible(timeout=60_000)
            page.screenshot(path=str(shots / "1-experiment-runs.png"))
            children_before = page.get_by_text("quality-", exact=False).count()
            page.get_by_role("row").filter(has_text=parent_name).get_by_role("button").first.click()
            expect(page.get_by_text("quality-", exact=False).first).to_be_visible(timeout=30_000)
            assert page.get_by_text("quality-", exact=False).count() > children_before
            page.screenshot(path=str(shots / "2-parent-expanded.png"))

            parent.click()
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("frontier.png", exact=True).click()
            image = page.locator("img[src*='frontier.png'], img[src^='blob:']").first
            expect(image).to_be_visible(timeout=30_000)
            assert image.evaluate("img => img.complete && img.naturalWidth > 100")  # decoded, not a broken icon
            page.screenshot(path=str(shots / "3-frontier-artifact.png"))

            page.goto(f"{url}/#/models/{model_name}/versions/1")
            link = page.locator(f"a[href*='{winner_run_id}']").first
            expect(link).to_be_visible(timeout=30_000)
            page.screenshot(path=str(shots / "4-model-version.png"))
        except Exception:
            page.screenshot(path=str(shots / "failed.png"))
            raise
        finally:
            browser.close()
