"""The tab's test panel in a real browser: a file of an earlier session, with and without it at one seed."""

from __future__ import annotations

import pytest

from lora_trainer.jobs import JobManager
from tests.fixtures.browser import browser_page  # skips without playwright/chromium, except in CI
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config
from tests.fixtures.ui_app import launch

pytestmark = pytest.mark.browser


def test_the_test_panel_makes_the_pair(tmp_path):
    root = tmp_path / "app"
    cfg = make_config(tmp_path, **{"training.max_train_steps": 1, "dataset.trigger_words": ["mychar"]})
    cfg.save.output_dir = None
    earlier = JobManager(FakeHost(root))  # a run of an earlier session: the page's manager restores it
    job = earlier.start(cfg)
    earlier.wait(job.id, timeout=120)
    assert job.state == "done", job.error
    app = launch(root)
    try:
        with browser_page(20_000) as page:
            page.goto(app.url)
            page.locator("#tabs > .tab-nav > button", has_text="LoRA Train").click()
            page.locator("#lora_train_test_panel").get_by_text("Test the LoRA").click()
            prompt = page.locator("#lora_train_test_prompt textarea")
            page.wait_for_function(
                "() => document.querySelector('#lora_train_test_prompt textarea').value === '<lora:tiny:1.0> mychar'"
            )
            for box, value in (("seed", "7"), ("width", "64"), ("height", "64")):
                page.locator(f"#lora_train_test_{box} input").fill(value)
            prompt.fill("<lora:tiny:1.0> mychar, smiling")
            page.locator("#lora_train_test_strength input[type=number]").fill("0.7")  # the slider sets the strength
            page.locator("#lora_train_test_generate").click()
            page.wait_for_function("() => document.querySelectorAll('#lora_train_test_images img').length === 2")
            text = page.locator("#lora_train_test_images").inner_text()
            assert "with: <lora:tiny:0.7> mychar, smiling" in text
            assert "without: mychar, smiling" in text
            assert ("pair", "tiny") in app.host.events
            page.screenshot(path=str(tmp_path / "test_panel.png"), full_page=True)
            # Interrupt is the WebUI's own (txt2img's button): the next pair stops at once.
            page.locator("#lora_train_test_interrupt").click()
            for _ in range(50):
                if app.host.interrupt:
                    break
                page.wait_for_timeout(100)
            assert app.host.interrupt
            page.locator("#lora_train_test_generate").click()
            page.locator("#lora_train_test_message", has_text="Interrupted").first.wait_for()
    finally:
        app.close()
