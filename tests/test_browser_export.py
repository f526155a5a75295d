"""The tab's Export / import in a real browser: the settings out as TOML with their command line, and back."""

from __future__ import annotations

import re

import pytest

from tests.fixtures.browser import browser_page  # skips without playwright/chromium, except in CI
from tests.fixtures.ui_app import launch

pytestmark = pytest.mark.browser


def test_export_then_load_an_edited_toml(tmp_path):
    app = launch(tmp_path / "app")
    try:
        with browser_page(20_000) as page:
            page.goto(app.url)
            page.locator("#tabs > .tab-nav > button", has_text="LoRA Train").click()
            page.locator("#lora_train_export").get_by_text("Export / import TOML").click()
            sections = page.locator("#lora_train_sections > .tab-nav > button")
            sections.filter(has_text="Save & samples").click()
            page.locator("#lora_train_cfg_save_output_name input").fill("exported_one")
            page.locator("#lora_train_export_button").click()
            page.wait_for_function(
                "() => document.querySelector('#lora_train_export_command textarea').value.includes('lora_trainer train')"
            )
            command = page.locator("#lora_train_export_command textarea").input_value()
            assert "exported_one.toml" in command
            assert "--checkpoint" in command
            text = page.locator("#lora_train_export_toml textarea").input_value()
            assert 'output_name = "exported_one"' in text
            assert (app.host.work_dir / "exports" / "exported_one.toml").read_text(encoding="utf-8") == text

            # an edited file comes back into the form
            edited = re.sub(r'output_name = "exported_one"', 'output_name = "edited_one"', text)
            edited = re.sub(r"network_dim = \d+", "network_dim = 24", edited)
            page.locator("#lora_train_export_toml textarea").fill(edited)
            page.locator("#lora_train_import_button").click()
            page.wait_for_function(
                "() => document.querySelector('#lora_train_cfg_save_output_name input').value === 'edited_one'"
            )
            sections.filter(has_text="Network & optimizer").click()
            assert page.locator("#lora_train_cfg_network_network_dim input").input_value() == "24"
            sections.filter(has_text="Save & samples").click()

            # an unknown key is named and the form stays
            page.locator("#lora_train_export_toml textarea").fill("[training_arguments]\nlearning_rat = 0.1\n")
            page.locator("#lora_train_import_button").click()
            page.locator("#lora_train_export_message", has_text="learning_rat").first.wait_for()
            assert page.locator("#lora_train_cfg_save_output_name input").input_value() == "edited_one"
            page.screenshot(path=str(tmp_path / "export.png"), full_page=True)
    finally:
        app.close()
