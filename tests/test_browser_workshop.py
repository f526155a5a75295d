"""The Dataset workshop in a real browser: Debian's chromium driven by Playwright, over the FakeHost.

One walk as a user would: open LoRA Train › Dataset workshop, create a workspace, import a
generated folder and upload a zip, try WD14 (no model here: a red message saying what to do),
caption with the harness's stand-in tagger, remove a tag in bulk and see the frequency table
change, undo, click a thumbnail and save its caption, check the training length, and find the
training images-folder field pointing at the workspace. Screenshots go to this test's tmp
folder (``created.png``, ``imported.png``, ``cleaned.png``, ``wd14.png``, ``captions.png``,
``tags.png``, ``removed.png``, ``edited.png``, ``advice.png``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from lora_trainer.workshop import Workspace
from tests.fixtures.browser import browser_page  # skips without playwright/chromium, except in CI
from tests.fixtures.images import COLOURS, make_image
from tests.fixtures.ui_app import launch

pytestmark = pytest.mark.browser

WAIT = 20_000  # ms, for any one thing to show


@pytest.fixture
def app(tmp_path):
    harness = launch(tmp_path / "app", workshop=True)
    yield harness
    harness.close()


@pytest.fixture
def page(app):
    with browser_page(WAIT) as page:
        yield page


def box(page, key: str):
    """The input of workshop component ``lora_train_ws_<key>``."""
    return page.locator(f"#lora_train_ws_{key}").locator("input, textarea").first


def html(page, key: str):
    """Workshop HTML component ``lora_train_ws_<key>`` (gradio 3.41 puts its elem_id on two nested divs)."""
    return page.locator(f"#lora_train_ws_{key}").first


def step(page, title: str) -> None:
    page.locator("#lora_train_ws_steps > .tab-nav > button", has_text=title).click()


def wait_text(page, selector: str, text: str, *, present: bool = True) -> None:
    """Wait until the element's text contains (or no longer contains) ``text``."""
    page.wait_for_function(
        "([sel, text, present]) => { const el = document.querySelector(sel);"
        " return !!el && el.innerText.includes(text) === present; }",
        arg=[selector, text, present],
    )


def tag_table(page) -> dict[str, int]:
    rows = page.locator("#lora_train_ws_tag_table tbody tr").all()
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        if len(cells) >= 2 and cells[0]:
            out[cells[0]] = int(float(cells[1]))
    return out


def test_workshop_from_images_to_training_folder(app, page, tmp_path):
    src = tmp_path / "pile"
    for i, colour in enumerate(COLOURS[:5]):
        make_image(src / "5_hero" / f"img{i}.png", colour, seed=i)
    make_image(src / "5_hero" / "see-through.png", (10, 10, 10), mode="RGBA", seed=9)
    (src / "5_hero" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    archive = tmp_path / "2_extra.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src / "5_hero" / "img0.png", "more/a.png")
        zf.write(src / "5_hero" / "img1.png", "more/b.png")
    workspace = Path(app.host.work_dir) / "datasets" / "hero"

    # Made after the UI was built: a fresh page lists it all the same.
    Workspace.create(Path(app.host.work_dir) / "datasets", "earlier")

    page.goto(app.url)
    page.locator("#tabs > .tab-nav > button", has_text="LoRA Train").click()
    page.wait_for_function("() => window.loraTrain && window.loraTrain.setup()")
    page.locator("#lora_train_sections > .tab-nav > button", has_text="Dataset workshop").click()
    html(page, "summary").wait_for()
    assert "No workspace open" in html(page, "summary").inner_text()
    page.locator("#lora_train_ws_select input").click()
    page.locator("#lora_train_ws_select ul.options li", has_text="earlier").wait_for()
    page.keyboard.press("Escape")

    # Create: selected in the dropdown, and the training folder now points at it.
    box(page, "new_name").fill("hero")
    page.locator("#lora_train_ws_create").click()
    page.locator("#lora_train_ws_message .lora_train_msg_info").wait_for()
    wait_text(page, "#lora_train_ws_summary", "Training reads this workspace")
    assert box(page, "select").input_value() == "hero"
    page.screenshot(path=str(tmp_path / "created.png"), full_page=True)

    # Import the folder (repeats from 5_hero), then upload the zip (2_extra).
    box(page, "folder").fill(str(src))
    page.locator("#lora_train_ws_import_folder").click()
    wait_text(page, "#lora_train_ws_import_report", "Imported 7 image(s)")
    page.locator("#lora_train_ws_zip_upload input[type=file]").set_input_files(str(archive))
    page.wait_for_function("() => document.querySelector('#lora_train_ws_zip_upload').innerText.includes('.zip')")
    page.locator("#lora_train_ws_import_zip").click()
    wait_text(page, "#lora_train_ws_import_report", "Imported 2 image(s) from 2_extra.zip")
    wait_text(page, "#lora_train_ws_summary", "9 images")
    summary = html(page, "summary").inner_text()
    assert "5_hero" in summary
    assert "2_extra" in summary
    page.screenshot(path=str(tmp_path / "imported.png"), full_page=True)

    # Clean: the broken JPEG is set aside, clearly reported.
    step(page, "Clean & size")
    page.locator("#lora_train_ws_clean").click()
    wait_text(page, "#lora_train_ws_clean_report", "1 moved to quarantine")
    assert "broken.jpg" in html(page, "clean_report").inner_text()
    page.screenshot(path=str(tmp_path / "cleaned.png"), full_page=True)

    # Captions: WD14 has no model here, and says what to do; the stand-in tagger captions.
    step(page, "Captions")
    page.locator("#lora_train_ws_captioner input").click()
    page.locator("#lora_train_ws_captioner ul.options li", has_text="WD14").click()
    page.locator("#lora_train_ws_caption").click()
    wait_text(page, "#lora_train_ws_caption_report", "onnxruntime")
    assert page.locator("#lora_train_ws_caption_report .lora_train_msg_error").count() == 1
    page.screenshot(path=str(tmp_path / "wd14.png"), full_page=True)
    page.locator("#lora_train_ws_captioner input").click()
    page.locator("#lora_train_ws_captioner ul.options li", has_text="Stub tagger").click()
    box(page, "triggers").fill("hero")
    page.locator("#lora_train_ws_caption").click()
    wait_text(page, "#lora_train_ws_caption_report", "Captions by stub")
    assert "8 written" in html(page, "caption_report").inner_text()
    page.screenshot(path=str(tmp_path / "captions.png"), full_page=True)

    # Tags: the frequency table, a bulk remove, undo.
    step(page, "Tags")
    page.wait_for_function("() => document.querySelectorAll('#lora_train_ws_gallery img').length === 8")
    tags = tag_table(page)
    assert tags["hero"] == 8, tags
    assert tags["solo"] == 8, tags
    assert tags["1girl"] == 8, tags
    page.screenshot(path=str(tmp_path / "tags.png"), full_page=True)
    box(page, "remove_tags").fill("solo")
    page.locator("#lora_train_ws_remove").click()
    wait_text(page, "#lora_train_ws_tag_report", "8 caption(s) changed")
    wait_text(page, "#lora_train_ws_tag_table", "solo", present=False)
    assert "solo" not in tag_table(page)
    assert tag_table(page)["hero"] == 8
    assert "solo" not in (workspace / "5_hero" / "img0.txt").read_text()
    page.screenshot(path=str(tmp_path / "removed.png"), full_page=True)
    page.locator("#lora_train_ws_undo").click()
    wait_text(page, "#lora_train_ws_tag_report", "Undone: remove solo")
    wait_text(page, "#lora_train_ws_tag_table", "solo")
    assert tag_table(page)["solo"] == 8

    # Click a tag to filter, click a thumbnail, edit its caption, save.
    page.locator("#lora_train_ws_tag_table tbody td", has_text="blue background").first.click()
    page.wait_for_function("() => document.querySelectorAll('#lora_train_ws_gallery img').length === 1")
    assert box(page, "filter").input_value() == "blue background"
    page.locator("#lora_train_ws_gallery img").first.click()
    page.wait_for_function(
        "() => (document.querySelector('#lora_train_ws_caption_text textarea') || {}).value?.startsWith('hero, ')"
    )
    assert box(page, "selected_id").input_value() == "5_hero/img2.png"
    page.locator("#lora_train_ws_selected_image img").wait_for()
    box(page, "caption_text").fill("hero, blue background, blue dress")
    page.locator("#lora_train_ws_save_caption").click()
    wait_text(page, "#lora_train_ws_editor_message", "Saved the caption of 5_hero/img2.png")
    assert (workspace / "5_hero" / "img2.txt").read_text() == "hero, blue background, blue dress"
    wait_text(page, "#lora_train_ws_tag_table", "blue dress")
    page.screenshot(path=str(tmp_path / "edited.png"), full_page=True)

    # Advice from the Training tab's settings (10 epochs, batch 1): 6 x 5 + 2 x 2 = 34 per epoch.
    step(page, "Advice")
    page.locator("#lora_train_ws_advise").click()
    wait_text(page, "#lora_train_ws_advice", "Total steps")
    advice = html(page, "advice").inner_text()
    assert "340 total steps" in advice
    assert "42.5 steps per image" in advice
    assert "Only 8 image(s); 15 or more" in advice
    assert "aim for at least 100" in advice
    assert "at least 1500" in advice
    assert box(page, "epochs").input_value() == "10"
    page.screenshot(path=str(tmp_path / "advice.png"), full_page=True)
    assert "Held out for validation" not in advice

    # The Training tab's validation split (2 images) is left out of the advice.
    page.evaluate(
        "() => { document.querySelector('#lora_train_cfg_validation_validation_count')"
        ".querySelector('input, textarea').value = '2'; }"
    )
    page.locator("#lora_train_ws_advise").click()
    wait_text(page, "#lora_train_ws_advice", "Held out for validation")
    assert "validation split come from the Training tab" in html(page, "advice").inner_text()

    # The training images folder is the workspace; nothing in the sources changed.
    value = page.evaluate(
        "() => document.querySelector('#lora_train_cfg_dataset_train_data_dir').querySelector('input, textarea').value"
    )
    assert Path(value) == workspace
    assert (src / "5_hero" / "broken.jpg").read_bytes() == b"\xff\xd8\xff not a jpeg"
    assert "Traceback" not in page.content()
