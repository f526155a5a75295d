// sd-webui-lora-train: the "LoRA Train" tab's browser side. Everything hangs off window.loraTrain;
// every element it touches has an elem_id starting with lora_train_ (or is the WebUI's own txt2img
// prompt and Lora refresh button). Works with the WebUI's helpers (gradioApp, updateInput,
// switch_to_txt2img) and without them (the test harness).
(function () {
    "use strict";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function byId(id) {
        return root().querySelector("#" + id);
    }

    function fireInput(el) {
        if (typeof updateInput === "function") {
            updateInput(el);
        } else {
            el.dispatchEvent(new Event("input", { bubbles: true }));
        }
    }

    function fieldId(path) {
        return "lora_train_cfg_" + path.replace(/\./g, "_");
    }

    // The tab button of the settings tab holding an element (same position as its tab item).
    function tabButton(el) {
        const item = el.closest(".tabitem");
        const tabs = item && item.parentElement;
        if (!tabs) return null;
        const items = Array.from(tabs.children).filter((c) => c.classList.contains("tabitem"));
        const nav = tabs.querySelector(":scope > .tab-nav");
        const buttons = nav ? nav.querySelectorAll("button") : [];
        return buttons[items.indexOf(item)] || null;
    }

    function revealTab(el) {
        const button = tabButton(el);
        if (button) button.click();
    }

    function switchToTxt2img() {
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
            return;
        }
        const first = root().querySelector("#tabs > .tab-nav > button");
        if (first) first.click();
    }

    // Make a tab's Lora cards list new files (tabname: txt2img or img2img): the hidden refresh
    // button of the WebUI's extra-networks Lora page (WebUI 1.7+), else the older visible one.
    function refreshLoraCards(tabname) {
        const tab = tabname || "txt2img";
        const internal = byId(tab + "_lora_extra_refresh_internal");
        if (internal) {
            internal.dispatchEvent(new Event("click"));
            return true;
        }
        const old = byId(tab + "_extra_refresh");
        if (old) {
            old.click();
            return true;
        }
        return false;
    }

    // When a run this page saw running ends with a file, refresh the txt2img and img2img Lora
    // panes once (the server's Lora list is refreshed already), so the new card shows.
    const activeJobs = new Set();
    function watchStatus() {
        const status = root().querySelector("#lora_train_status .lora_train_status");
        if (!status || !status.dataset.job) return;
        const job = status.dataset.job;
        const state = status.dataset.state;
        if (state === "queued" || state === "running") {
            activeJobs.add(job);
        } else if (activeJobs.delete(job) && status.dataset.file) {
            refreshLoraCards("txt2img");
            refreshLoraCards("img2img");
        }
    }

    function sendToTxt2img(text) {
        if (!text) return false;
        const prompt = root().querySelector("#txt2img_prompt textarea");
        if (!prompt) {
            console.warn("lora_train: no txt2img prompt box (#txt2img_prompt textarea)");
            return false;
        }
        const current = prompt.value;
        if (!current.includes(text)) {
            const head = current.replace(/[\s,]+$/, "");
            prompt.value = head ? head + ", " + text : text;
            fireInput(prompt);
        }
        switchToTxt2img();
        refreshLoraCards();
        return true;
    }

    // Bring a setting into view (links in the red message box call this).
    function showField(path) {
        const el = byId(fieldId(path));
        if (!el) return false;
        revealTab(el);
        setTimeout(function () {
            el.scrollIntoView({ behavior: "smooth", block: "center" });
            const input = el.querySelector("input, textarea");
            if (input) input.focus({ preventScroll: true });
        }, 50);
        return false;
    }

    // Red outline on every field the message box names, and on its settings tab's button;
    // cleared when the message changes.
    function markInvalid() {
        const box = byId("lora_train_message");
        if (!box) return;
        root()
            .querySelectorAll(".lora_train_invalid, .lora_train_tab_invalid")
            .forEach((el) => el.classList.remove("lora_train_invalid", "lora_train_tab_invalid"));
        box.querySelectorAll("[data-field]").forEach(function (link) {
            const el = byId(fieldId(link.dataset.field));
            if (!el) return;
            el.classList.add("lora_train_invalid");
            const button = tabButton(el);
            if (button) button.classList.add("lora_train_tab_invalid");
        });
    }

    // Full help text as each field's tooltip (the short version is shown under its label).
    function applyHelp() {
        const data = byId("lora_train_help_data");
        if (!data) return false;
        const help = JSON.parse(data.textContent);
        Object.keys(help).forEach(function (id) {
            const el = byId(id);
            if (el) el.title = help[id];
        });
        return true;
    }

    // The Training tab's epochs, batch size and max steps, for the dataset workshop's advice
    // (its Advise button sends these instead of its own boxes); each falls back to the given value.
    function value(path) {
        const el = byId(fieldId(path));
        const input = el && el.querySelector("input, textarea");
        return input ? input.value : null;
    }

    function trainingValues(epochs, batch, steps) {
        const e = value("training.max_train_epochs");
        const b = value("training.train_batch_size");
        const s = value("training.max_train_steps");
        return [
            e !== null && e !== "" ? Number(e) : epochs,
            b !== null && b !== "" ? Number(b) : batch,
            s !== null ? s : steps,
        ];
    }

    function validationValues(split, count) {
        const s = value("validation.validation_split");
        const c = value("validation.validation_count");
        return [s !== null && s !== "" ? Number(s) : split, c !== null ? c : count];
    }

    let ready = false;
    function setup() {
        if (ready || !byId("lora_train_message") || !applyHelp()) return ready;
        new MutationObserver(markInvalid).observe(byId("lora_train_message"), {
            childList: true,
            subtree: true,
            characterData: true,
        });
        const status = byId("lora_train_status");
        if (status) {
            new MutationObserver(watchStatus).observe(status, { childList: true, subtree: true, attributes: true });
            watchStatus();
        }
        ready = true;
        return ready;
    }

    window.loraTrain = {
        sendToTxt2img: sendToTxt2img,
        showField: showField,
        refreshLoraCards: refreshLoraCards,
        markInvalid: markInvalid,
        setup: setup,
        trainingValues: trainingValues,
        validationValues: validationValues,
    };

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup); // the WebUI's hook: the whole UI is in the page
    }
    // Without the WebUI (or if the tab renders late): try until the tab is there.
    let tries = 0;
    const timer = setInterval(function () {
        if (setup() || ++tries > 120) clearInterval(timer);
    }, 500);
})();
