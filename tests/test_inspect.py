"""lora_trainer.files.inspection and ``python -m lora_trainer inspect``."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_trainer.__main__ import main
from lora_trainer.errors import LoraFileError
from lora_trainer.files import hashes, kohya_metadata, lora_file
from lora_trainer.files.inspection import NETWORK_TYPES, detect_family, format_report, inspect_lora

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 1.0


@functools.cache
def golden(family: str) -> dict:
    return json.loads((DATA / f"lora_keys_{family}.json").read_text())


def golden_names(family: str, conv: bool) -> set[str]:
    return {m["kohya"] for m in golden(family)["modules"] if conv or not m["conv_dim_only"]}


def kohya_state_dict(family: str, conv: bool, *, groups=("unet", "te", "te1", "te2")) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA state dict with the golden keys and shapes (zeros: only layout matters)."""
    sd = {}
    for m in golden(family)["modules"]:
        if (m["conv_dim_only"] and not conv) or m["group"] not in groups:
            continue
        r = CONV_RANK if m["rank_from"] == "conv_dim" else RANK
        alpha = CONV_ALPHA if m["rank_from"] == "conv_dim" else ALPHA
        sd[f"{m['kohya']}.lora_down.weight"] = torch.zeros([r if s == "r" else s for s in m["lora_down_shape"]])
        sd[f"{m['kohya']}.lora_up.weight"] = torch.zeros([r if s == "r" else s for s in m["lora_up_shape"]])
        sd[f"{m['kohya']}.alpha"] = torch.tensor(alpha)
    return sd


def save_plain(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write like any other tool would: plain safetensors, no sshs hashes added."""
    safetensors.torch.save_file({k: v.to(torch.float16) for k, v in sd.items()}, str(path), metadata)
    return path


@pytest.fixture
def fake_naming(monkeypatch):
    """A ``lora_trainer.naming`` exposing ``kohya_names`` backed by the golden lists."""
    module = types.ModuleType("lora_trainer.naming")
    module.kohya_names = lambda family, conv=True: golden_names(family, conv)
    monkeypatch.setitem(sys.modules, "lora_trainer.naming", module)
    return module


def rows(report, group, cls):
    return [(r["rank"], r["alpha"], r["count"]) for r in report["groups"][group].get(cls, [])]


# ------------------------------------------------------------------ golden kohya layouts

EXPECTED_GROUPS = {"sd1": ("te", "unet"), "sd2": ("te", "unet"), "sdxl": ("te1", "te2", "unet")}


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_golden_layout_with_our_metadata(tmp_path, fake_naming, family, conv):
    sd = kohya_state_dict(family, conv)
    info = kohya_metadata.TrainingInfo(
        family=family,
        output_name=f"{family}_lora",
        network_dim=RANK,
        network_alpha=ALPHA,
        conv_dim=CONV_RANK if conv else None,
        conv_alpha=CONV_ALPHA if conv else None,
        tag_frequency={"5_a": {"mychar": 5, "1girl": 4}, "3_b": {"mychar": 3, "solo": 1}},
        training_comment="mychar",
        steps=100,
        epoch=2,
    )
    path = lora_file.save_lora(tmp_path / "x.safetensors", sd, kohya_metadata.build_metadata(info))
    report = inspect_lora(path)

    counts = golden(family)["counts"]
    assert report["module_count"] == (counts["modules_with_conv_dim"] if conv else counts["modules_default"])
    assert report["tensor_count"] == 3 * report["module_count"]
    assert report["family"] == family
    assert report["family_source"].startswith("metadata")
    assert report["v_prediction"] is False
    assert report["network_type"] == ("LoCon" if conv else "LoRA")
    assert report["module_types"] == {"lora": report["module_count"]}
    assert report["dtypes"] == {"F16": report["tensor_count"]}
    assert tuple(report["groups"]) == EXPECTED_GROUPS[family]
    n_conv3 = sum(1 for m in golden(family)["modules"] if m["kind"] == "conv3x3" and conv)
    for group in EXPECTED_GROUPS[family]:
        members = sum(1 for m in golden(family)["modules"] if m["group"] == group and (conv or not m["conv_dim_only"]))
        linear = members - (n_conv3 if group == "unet" else 0)
        assert rows(report, group, "linear") == [(RANK, ALPHA, linear)]
    assert rows(report, "unet", "conv") == ([(CONV_RANK, CONV_ALPHA, n_conv3)] if conv else [])
    assert report["unplaced_key_count"] == 0
    assert report["incomplete_modules"] == []
    check = report["kohya_name_check"]
    assert check["checked"]
    assert check["not_kohya_count"] == 0
    assert check["present"] == report["module_count"]
    assert report["hashes"]["model_hash_matches"] is True
    md = report["metadata"]
    assert md["output_name"] == f"{family}_lora"
    assert md["training_comment"] == "mychar"
    assert (md["steps"], md["epoch"]) == ("100", "2")
    assert md["tag_count"] == 3
    assert md["top_tags"][0] == ["mychar", 8]
    assert report["warnings"] == []
    json.dumps(report)


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_from_keys_without_metadata(tmp_path, family, conv):
    path = save_plain(tmp_path / "k.safetensors", kohya_state_dict(family, conv))
    report = inspect_lora(path)
    assert report["family"] == family
    assert report["family_source"].startswith("keys")
    assert report["v_prediction"] is None
    assert report["metadata_key_count"] == 0
    assert report["hashes"]["sshs_model_hash"] is None
    assert report["hashes"]["data_sha256"] == hashes.file_data_sha256(path)
    assert "metadata  none" in format_report(report)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_from_unet_only_keys(tmp_path, family):
    path = save_plain(tmp_path / "u.safetensors", kohya_state_dict(family, False, groups=("unet",)))
    assert inspect_lora(path)["family"] == family


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_family_from_text_encoder_only_keys(tmp_path, family):
    path = save_plain(tmp_path / "t.safetensors", kohya_state_dict(family, False, groups=("te",)))
    assert inspect_lora(path)["family"] == family


def test_family_rules_one_at_a_time(tmp_path):
    """Each key-based rule on its own, where the other rules have nothing to go on."""
    # SDXL: compvis UNet names only (resnet layers: no cross-attention to measure)
    sd = {
        f"{m['kohya']}.lora_down.weight": torch.zeros([1 if s == "r" else s for s in m["lora_down_shape"]])
        for m in golden("sdxl")["modules"]
        if m["conv_dim_only"]
    }
    report = inspect_lora(save_plain(tmp_path / "a.safetensors", sd))
    assert (report["family"], report["family_source"]) == (
        "sdxl",
        "keys: compvis-style UNet keys (lora_unet_input_blocks_...)",
    )
    # SD2: the text encoder's width alone (layer 0 only)
    sd = {f"{'lora_te_text_model_encoder_layers_0_self_attn_q_proj'}.lora_down.weight": torch.zeros(4, 1024)}
    report = inspect_lora(save_plain(tmp_path / "b.safetensors", sd))
    assert (report["family"], report["family_source"]) == ("sd2", "keys: text encoder width 1024")
    # SD2: the text encoder's depth alone (a type whose tensors don't show the width)
    sd = {"lora_te_text_model_encoder_layers_22_mlp_fc1.lokr_w1": torch.zeros(8, 8)}
    report = inspect_lora(save_plain(tmp_path / "c.safetensors", sd))
    assert report["family"] == "sd2"
    assert "layer 22" in report["family_source"]
    # SD1: width 768
    sd = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}
    assert inspect_lora(save_plain(tmp_path / "d.safetensors", sd))["family"] == "sd1"


def test_sd2_single_file_conv_projections(tmp_path):
    """kohya's SD2 from a single-file checkpoint writes 4-D proj_in/proj_out: still SD2, 1x1 = network_dim."""
    sd = kohya_state_dict("sd2", False)
    for m in golden("sd2")["modules"]:
        if "kohya_single_file_ckpt_lora_down_shape" in m:
            sd[f"{m['kohya']}.lora_down.weight"] = torch.zeros(
                [RANK if s == "r" else s for s in m["kohya_single_file_ckpt_lora_down_shape"]]
            )
            sd[f"{m['kohya']}.lora_up.weight"] = torch.zeros(
                [RANK if s == "r" else s for s in m["kohya_single_file_ckpt_lora_up_shape"]]
            )
    report = inspect_lora(save_plain(tmp_path / "s.safetensors", sd))
    assert report["family"] == "sd2"
    assert report["module_kinds"]["conv1x1"] == 32
    assert report["network_type"] == "LoRA"
    assert "conv" not in report["groups"]["unet"]


def test_metadata_family_wins_but_disagreement_is_reported(tmp_path):
    sd = kohya_state_dict("sd1", False)
    path = save_plain(tmp_path / "m.safetensors", sd, {"ss_base_model_version": "sdxl_base_v1-0"})
    report = inspect_lora(path)
    assert report["family"] == "sdxl"
    assert any("metadata says sdxl" in w and "sd1" in w for w in report["warnings"])


@pytest.mark.parametrize(
    ("metadata", "family", "v_pred"),
    [
        ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "sd2", True),
        ({"ss_v2": "True"}, "sd2", None),
        ({"ss_v2": "False"}, "sd1", None),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v"}, "sd2", True),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl", None),
    ],
)
def testfamily_from_metadata_variants(metadata, family, v_pred):
    assert detect_family(metadata, {})[0] == family
    from lora_trainer.files.inspection import family_from_metadata

    assert family_from_metadata(metadata)[:2] == (family, v_pred)


def test_kohya_name_check_flags_foreign_modules(tmp_path, fake_naming):
    sd = kohya_state_dict("sd1", False)
    sd["lora_unet_conv_in.lora_down.weight"] = torch.zeros(RANK, 4, 3, 3)
    sd["lora_unet_conv_in.lora_up.weight"] = torch.zeros(320, RANK, 1, 1)
    report = inspect_lora(save_plain(tmp_path / "f.safetensors", sd, {"ss_base_model_version": "sd_v1"}))
    check = report["kohya_name_check"]
    assert check["checked"] is True
    assert check["not_kohya"] == ["lora_unet_conv_in"]
    assert check["not_kohya_count"] == 1
    assert "not kohya targets: lora_unet_conv_in" in format_report(report)


def test_kohya_name_check_skipped_without_kohya_names(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lora_trainer.naming", types.ModuleType("lora_trainer.naming"))
    report = inspect_lora(save_plain(tmp_path / "n.safetensors", kohya_state_dict("sd1", False)))
    assert report["kohya_name_check"]["checked"] is False
    assert "kohya_names" in report["kohya_name_check"]["reason"]


def test_kohya_name_check_with_real_naming_module(tmp_path):
    naming = pytest.importorskip("lora_trainer.naming")
    if not callable(getattr(naming, "kohya_names", None)):
        pytest.skip("lora_trainer.naming has no kohya_names() yet")
    for family in ("sd1", "sd2", "sdxl"):
        assert set(naming.kohya_names(family, conv=True)) == golden_names(family, True)
    report = inspect_lora(save_plain(tmp_path / "r.safetensors", kohya_state_dict("sdxl", True)))
    assert report["kohya_name_check"]["not_kohya_count"] == 0


# ------------------------------------------------------------------ other network types

SD1_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD1_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def test_loha_file(tmp_path):
    sd = {}
    for name, (out_f, in_f) in {SD1_Q: (768, 768), SD1_TO_K: (320, 768)}.items():
        sd |= {
            f"{name}.hada_w1_a": torch.zeros(out_f, 8),
            f"{name}.hada_w1_b": torch.zeros(8, in_f),
            f"{name}.hada_w2_a": torch.zeros(out_f, 8),
            f"{name}.hada_w2_b": torch.zeros(8, in_f),
            f"{name}.alpha": torch.tensor(4.0),
        }
    # a conv layer with Tucker factors
    sd |= {
        f"{SD1_CONV}.hada_w1_a": torch.zeros(4, 320),
        f"{SD1_CONV}.hada_w1_b": torch.zeros(4, 320),
        f"{SD1_CONV}.hada_t1": torch.zeros(4, 4, 3, 3),
        f"{SD1_CONV}.hada_w2_a": torch.zeros(4, 320),
        f"{SD1_CONV}.hada_w2_b": torch.zeros(4, 320),
        f"{SD1_CONV}.hada_t2": torch.zeros(4, 4, 3, 3),
        f"{SD1_CONV}.alpha": torch.tensor(1.0),
    }
    report = inspect_lora(save_plain(tmp_path / "loha.safetensors", sd, {"ss_network_module": "lycoris.kohya"}))
    assert report["network_type"] == "LoHa"
    assert report["module_types"] == {"loha": 3}
    assert report["family"] == "sd1"  # from the 768-wide text encoder / cross-attention
    assert rows(report, "te", "linear") == [(8, 4.0, 1)]
    assert rows(report, "unet", "linear") == [(8, 4.0, 1)]
    assert rows(report, "unet", "conv") == [(4, 1.0, 1)]
    assert report["unplaced_key_count"] == 0
    assert report["metadata"]["network_module"] == "lycoris.kohya"


def test_lokr_file(tmp_path):
    sd = {
        f"{SD1_Q}.lokr_w1": torch.zeros(8, 8),
        f"{SD1_Q}.lokr_w2_a": torch.zeros(96, 2),
        f"{SD1_Q}.lokr_w2_b": torch.zeros(2, 96),
        f"{SD1_Q}.alpha": torch.tensor(2.0),
        f"{SD1_TO_K}.lokr_w1_a": torch.zeros(8, 1),
        f"{SD1_TO_K}.lokr_w1_b": torch.zeros(1, 8),
        f"{SD1_TO_K}.lokr_w2": torch.zeros(40, 96),
    }
    report = inspect_lora(save_plain(tmp_path / "lokr.safetensors", sd))
    assert report["network_type"] == "LoKr"
    assert report["module_types"] == {"lokr": 2}
    assert rows(report, "te", "linear") == [(2, 2.0, 1)]
    assert rows(report, "unet", "linear") == [(1, None, 1)]
    assert report["incomplete_modules"] == []


def test_other_types_dora_and_mixtures(tmp_path):
    sd = {
        f"{SD1_Q}.lora_down.weight": torch.zeros(4, 768),
        f"{SD1_Q}.lora_up.weight": torch.zeros(768, 4),
        f"{SD1_Q}.alpha": torch.tensor(4.0),
        f"{SD1_Q}.dora_scale": torch.zeros(1, 768),
        f"{SD1_TO_K}.weight": torch.zeros(320),
        f"{SD1_TO_K}.on_input": torch.tensor(False),
        "lora_unet_down_blocks_0_attentions_0_norm.w_norm": torch.zeros(320),
        "lora_unet_down_blocks_0_attentions_0_norm.b_norm": torch.zeros(320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.diff": torch.zeros(320, 320, 1, 1),
    }
    report = inspect_lora(save_plain(tmp_path / "mix.safetensors", sd))
    assert report["module_types"] == {"lora": 1, "ia3": 1, "norm": 1, "full": 1}
    assert report["dora_modules"] == 1
    assert report["network_type"].endswith("(DoRA)")
    assert report["network_type"].startswith("LoRA + ")
    assert report["unplaced_key_count"] == 0


def test_registry_is_one_line_per_type():
    assert {t.name for t in NETWORK_TYPES} >= {"lora", "loha", "lokr", "ia3", "glora", "full", "norm"}
    assert all(t.parts for t in NETWORK_TYPES)


def test_unplaced_and_incomplete(tmp_path):
    sd = kohya_state_dict("sd1", False, groups=("te",))
    sd["lora_unet_something.lora_down.weight"] = torch.zeros(4, 320)  # no lora_up
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.mystery"] = torch.zeros(3)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(3)
    sd["lora_unet_nodot"] = torch.zeros(1)
    report = inspect_lora(save_plain(tmp_path / "u.safetensors", sd))
    assert report["unplaced_keys"] == [
        "lora_te_text_model_encoder_layers_0_mlp_fc1.mystery",
        "lora_unet_nodot",
        "model.diffusion_model.out.2.weight",
    ]
    assert report["incomplete_modules"] == ["lora_unet_something"]
    assert report["module_types"]["lora (incomplete)"] == 1
    assert any("cannot be placed" in w for w in report["warnings"])
    assert any("missing tensors" in w for w in report["warnings"])
    assert "unplaced  3 keys" in format_report(report)


def test_hash_mismatch_is_detected(tmp_path):
    path = lora_file.save_lora(tmp_path / "h.safetensors", kohya_state_dict("sd1", False), {"ss_output_name": "h"})
    tensors, metadata = lora_file.load_lora(path)
    tensors[f"{SD1_Q}.alpha"] = torch.tensor(3.0, dtype=torch.float16)  # edited after saving
    safetensors.torch.save_file(tensors, str(path), metadata)
    report = inspect_lora(path)
    assert report["hashes"]["model_hash_matches"] is False
    assert any("does not match" in w for w in report["warnings"])
    assert "DOES NOT match" in format_report(report)


# ------------------------------------------------------------------ errors and the CLI


def test_non_lora_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(LoraFileError, match="not a LoRA"):
        inspect_lora(path)


def test_cli_table_and_json(tmp_path, capsys):
    path = lora_file.save_lora(
        tmp_path / "c.safetensors",
        kohya_state_dict("sd1", True),
        kohya_metadata.build_metadata(
            kohya_metadata.TrainingInfo(family="sd1", output_name="cli_lora", conv_dim=2, conv_alpha=1)
        ),
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LoCon" in out
    assert "sd1" in out
    assert "cli_lora" in out
    assert "matches the data" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == inspect_lora(path)


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bad.safetensors")
    assert err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_cli_subprocess_exit_codes(tmp_path):
    good = lora_file.save_lora(tmp_path / "g.safetensors", kohya_state_dict("sd1", False), {})
    pickle = tmp_path / "p.pt"
    torch.save({"a": torch.zeros(1)}, pickle)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "lora_trainer", *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )

    ok = run("inspect", str(good), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["family"] == "sd1"
    refused = run("inspect", str(pickle))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: p.pt")
    assert "pickle" in refused.stderr.lower()
    assert refused.stdout == ""
