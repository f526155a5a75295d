"""The tab's Results section in a real browser (Playwright + Debian's chromium, over the FakeHost):
pick a finished run, see the suggested epoch, make a grid, keep a file without replacing the final one.
Screenshot: ``results.png`` in this test's tmp folder."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.fixtures.browser import browser_page  # skips without playwright/chromium, except in CI
from tests.fixtures.saved_runs import saved_run
from tests.fixtures.ui_app import launch
from tests.fixtures.webui_models import build_webui_model

pytestmark = pytest.mark.browser


def test_grid_and_keep_from_the_tab(tmp_path):
    harness = launch(tmp_path / "app")
    job, files = saved_run(tmp_path / "run", build_webui_model("sd1", "tiny", seed=0))
    harness.manager._jobs[job.id] = job
    try:
        with browser_page(20_000) as page:
            page.goto(harness.url)
            page.locator("#tabs > .tab-nav > button", has_text="LoRA Train").click()
            page.locator("#lora_train_results", has_text="Results").locator(".label-wrap").first.click()
            page.locator("#lora_train_results_refresh").click()
            page.locator("#lora_train_results_best", has_text="tiny-000002").first.wait_for()
            page.locator("#lora_train_results_prompts textarea").fill("a photo of sks")
            page.locator("#lora_train_results_strengths textarea").fill("0, 1")
            for size in ("width", "height"):
                page.locator(f"#lora_train_results_{size} input").fill("64")
            page.locator("#lora_train_results_make").click()
            page.locator("#lora_train_results_grid img").wait_for()
            expect(page.locator("#lora_train_results_message").first).to_contain_text("8 images")
            page.locator("#lora_train_results_keep").click()
            page.locator("#lora_train_results_kept", has_text="kept tiny_1.safetensors").first.wait_for()
            page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
    finally:
        harness.close()
    assert (files[3].parent / "tiny_1.safetensors").read_bytes() == files[1].read_bytes()
    assert files[3].read_bytes() != files[1].read_bytes()
