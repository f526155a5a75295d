"""The LoRA Train tab in a real browser: Debian's chromium driven by Playwright, over the FakeHost.

One walk through the tab as a user would: open it, pick the "quick-test" preset, point it at a
tiny 64 px dataset, press Start and read the red message naming the field to fix, fix it, start
again, watch progress, reload the page mid-run (it reconnects), get the file, send it to txt2img.
Screenshots go to this test's tmp folder (``tab.png``, ``error.png``, ``running.png``, ``done.png``,
``sent.png``).
"""

from __future__ import annotations

import threading

import pytest

from tests.fixtures.browser import browser_page  # skips without playwright/chromium, except in CI
from tests.fixtures.training import make_dataset
from tests.fixtures.ui_app import launch

pytestmark = pytest.mark.browser

STEPS = 6
HOLD_AT = 2  # the run waits at this step until the test has reloaded the page


@pytest.fixture
def app(tmp_path):
    harness = launch(tmp_path / "app")
    harness.release = threading.Event()
    original = harness.host.on_job_progress

    def held_progress(job):
        original(job)
        if job.phase == "Training" and job.step == HOLD_AT:
            harness.release.wait(60)

    harness.host.on_job_progress = held_progress
    yield harness
    harness.release.set()
    harness.close()


@pytest.fixture
def page(app):
    with browser_page(20_000) as page:
        yield page


def field(page, path: str):
    return page.locator(f"#lora_train_cfg_{path.replace('.', '_')}")


def field_input(page, path: str):
    """The setting's input, brought into view with the tab's own showField (switches settings tabs)."""
    page.evaluate("(path) => loraTrain.showField(path)", path)
    # showField focuses the input a moment later; wait for it, or that late focus would take the
    # keystrokes of the next field filled.
    elem_id = f"lora_train_cfg_{path.replace('.', '_')}"
    page.wait_for_function(
        "(id) => { const a = document.activeElement; return !!a && !!a.closest('#' + id); }", arg=elem_id
    )
    return field(page, path).locator("input, textarea").first


def open_tab(page, url: str) -> None:
    page.goto(url)
    page.locator("#tabs > .tab-nav > button", has_text="LoRA Train").click()
    page.locator("#lora_train_status .lora_train_status").wait_for()
    page.wait_for_function("() => window.loraTrain && window.loraTrain.setup()")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option in a gradio 3.41 dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} ul.options li", has_text=option).first.click()


def test_train_from_the_tab(app, page, tmp_path):
    data = make_dataset(tmp_path / "data")
    open_tab(page, app.url)
    page.screenshot(path=str(tmp_path / "tab.png"), full_page=True)
    assert "tiny.safetensors" in page.locator("#lora_train_model_info .lora_train_model").inner_text()

    # The preset fills the fields.
    choose(page, "lora_train_preset", "quick-test")
    page.wait_for_function(
        "() => document.querySelector('#lora_train_cfg_save_output_name input').value === 'lora_quick_test'"
    )
    assert field_input(page, "training.max_train_steps").input_value() == "10"
    assert "quick-test" in page.locator("#lora_train_preset_info .lora_train_msg").inner_text()

    field_input(page, "sample.sample_prompts").fill("tiny photo")
    field_input(page, "sample.sample_every_n_steps").fill("3")
    field_input(page, "training.max_train_steps").fill(str(STEPS))
    field_input(page, "dataset.resolution").fill("64")
    field_input(page, "dataset.train_data_dir").fill(str(data))
    page.keyboard.press("Tab")  # commit the last edit before Start reads the fields

    # Buckets are on with a 256 px smallest bucket: Start names that field in red, nothing runs.
    page.locator("#lora_train_start").click()
    message = page.locator("#lora_train_message .lora_train_msg_error")
    message.wait_for()
    assert "Smallest bucket side" in message.inner_text()
    assert "dataset.min_bucket_reso" in message.inner_text()
    page.wait_for_selector("#lora_train_cfg_dataset_min_bucket_reso.lora_train_invalid", state="attached")
    flagged = page.locator("#lora_train_sections > .tab-nav > button.lora_train_tab_invalid").all_inner_texts()
    assert [t.strip(" •") for t in flagged] == ["Dataset"]  # the settings tab holding the field
    assert "Traceback" not in page.content()
    assert app.manager.latest() is None
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

    # Following the link shows the field; turning buckets off fixes it.
    message.locator("a.lora_train_field_link").first.click()
    field_input(page, "dataset.enable_bucket").uncheck()
    page.locator("#lora_train_start").click()
    page.locator("#lora_train_message .lora_train_msg_info").wait_for()

    status = page.locator("#lora_train_status .lora_train_status")
    page.wait_for_selector('#lora_train_status [data-state="running"] .lora_train_step', timeout=30_000)
    page.wait_for_function(
        "(s) => document.querySelector('#lora_train_status .lora_train_status').innerText.includes(s)",
        arg=f"Step {HOLD_AT} / {STEPS}",
        timeout=30_000,
    )
    assert page.locator("#lora_train_stop").is_enabled()
    assert not page.locator("#lora_train_start").is_enabled()
    page.wait_for_selector("#lora_train_loss_plot svg polyline")
    page.screenshot(path=str(tmp_path / "running.png"), full_page=True)

    # A reloaded page reconnects to the running job: its progress, its Stop, its settings.
    open_tab(page, app.url)
    page.wait_for_selector('#lora_train_status [data-state="running"]')
    assert f"Step {HOLD_AT} / {STEPS}" in status.inner_text()
    page.wait_for_function("() => !document.querySelector('#lora_train_stop').disabled")
    page.wait_for_function(
        "(d) => document.querySelector('#lora_train_cfg_dataset_train_data_dir input').value === d", arg=str(data)
    )
    assert field_input(page, "dataset.resolution").input_value() == "64"
    app.release.set()

    page.wait_for_selector('#lora_train_status [data-state="done"]', timeout=60_000)
    text = status.inner_text()
    assert f"Step {STEPS} / {STEPS}" in text
    assert "Done" in text
    lora = app.host.lora_dir / "lora_quick_test.safetensors"
    assert lora.is_file()
    assert lora.name in text
    page.wait_for_function("() => document.querySelectorAll('#lora_train_samples img').length >= 1")
    page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
    # the run ended with a file: the txt2img and img2img Lora panes were refreshed, once each
    for count in ("harness_refresh_count", "harness_img2img_refresh_count"):
        page.wait_for_function(f"() => document.querySelector('#{count} input').value === '1'")
    page.wait_for_timeout(1500)  # a few more status polls: still once
    assert page.locator("#harness_img2img_refresh_count input").input_value() == "1"

    # Send to txt2img: the prompt gets the LoRA, the txt2img tab shows, the Lora list refreshes.
    page.locator("#txt2img_prompt textarea").evaluate("(el) => { el.value = 'a photo'; }")
    send = page.locator("#lora_train_send_to_txt2img")
    page.wait_for_function("() => !document.querySelector('#lora_train_send_to_txt2img').disabled")
    send.click()
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.wait_for(state="visible")
    assert prompt.input_value() == "a photo, <lora:lora_quick_test:1.0>"
    page.screenshot(path=str(tmp_path / "sent.png"))
    page.wait_for_function("() => document.querySelector('#harness_refresh_count input').value === '2'")
