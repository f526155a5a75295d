"""lora_trainer.files: kohya metadata, sshs hashes, atomic LoRA save/load, resume state without pickle."""

from __future__ import annotations

import collections
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from lora_trainer.errors import ConfigError, LoraFileError
from lora_trainer.files import atomic_write, hashes, kohya_metadata, lora_file, resume_state

DATA = Path(__file__).parent / "data"
META_REF = json.loads((DATA / "metadata_keys.json").read_text())
WORKED = META_REF["sshs_keys"]["worked_examples"]
ALL_SS_KEYS = {k["key"] for k in META_REF["ss_keys"]}


def small_lora(dtype=torch.float32, rank=4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(
            rank, 320, 1, 1, generator=g, dtype=dtype
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(
            320, rank, 1, 1, generator=g, dtype=dtype
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0, dtype=dtype),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(
            rank, 768, generator=g, dtype=dtype
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(
            768, rank, generator=g, dtype=dtype
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0, dtype=dtype),
    }


def big_lora() -> dict[str, torch.Tensor]:
    """> 1 MiB serialized, so the legacy hash covers real bytes."""
    return {
        "lora_unet_x.lora_down.weight": torch.arange(400000, dtype=torch.float32).reshape(4, 100000) / 1000,
        "lora_unet_x.lora_up.weight": torch.ones(8, 4),
        "lora_unet_x.alpha": torch.tensor(4.0),
    }


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------ hashes


def test_tiny_worked_example():
    example = WORKED["tiny"]
    raw = bytes.fromhex(example["bytes_hex"])
    assert hashes.hashes_from_bytes(raw) == (
        example["kohya_addnet_hash_safetensors"],
        example["kohya_addnet_hash_legacy"],
    )
    # the example is what safetensors writes for {"a": [1., 2.]} without metadata
    assert safetensors.torch.save({"a": torch.tensor([1.0, 2.0])}) == raw
    assert hashes.compute_hashes({"a": torch.tensor([1.0, 2.0])}, {}) == (
        "b9c80b5adeca450753a16950c3cc655d271f7bef7a485bc83f112b72fef21d37",
        "e3b0c442",
    )


def test_precalc_worked_example():
    example = WORKED["precalc"]
    tensors = {
        "lora_unet_x.lora_down.weight": torch.arange(400000, dtype=torch.float32).reshape(4, 100000),
        "lora_unet_x.alpha": torch.tensor(1.0, dtype=torch.float32),
    }
    metadata = dict(example["metadata"])
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    assert len(safetensors.torch.save(tensors, ss_only)) == example["serialized_len"]
    assert list(hashes.compute_hashes(tensors, metadata)) == example["kohya"]
    # modelspec.* and sshs_* never enter the hashes
    metadata["modelspec.title"] = "something else entirely, and much longer than before " * 10
    metadata["sshs_model_hash"] = "0" * 64
    assert list(hashes.compute_hashes(tensors, metadata)) == example["kohya"]


def test_legacy_hash_depends_on_ss_metadata_but_model_hash_does_not():
    tensors = big_lora()
    base = hashes.compute_hashes(tensors, {"ss_a": "1"})
    longer = hashes.compute_hashes(tensors, {"ss_a": "1", "ss_b": "x" * 100})
    assert base[0] == longer[0]
    assert base[1] != longer[1]
    assert base[1] != "e3b0c442"


# ------------------------------------------------------------------ metadata


def full_info(**overrides) -> kohya_metadata.TrainingInfo:
    values = {
        "family": "sd1",
        "output_name": "my_lora",
        "network_dim": 16,
        "network_alpha": 8,
        "conv_dim": 8,
        "conv_alpha": 4.0,
        "resolution": (512, 768),
        "num_train_images": 400,
        "tag_frequency": {"10_mychar": {"mychar": 40, "1girl": 38}},
        "dataset_dirs": {"10_mychar": {"n_repeats": 10, "img_count": 40}},
        "bucket_info": {"buckets": {0: {"resolution": (512, 512), "count": 400}}, "mean_img_ar_error": 0.0},
        "max_train_steps": 2000,
        "num_epochs": 10,
        "steps": 1000,
        "epoch": 5,
        "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5,
        "unet_lr": 1e-4,
        "optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)",
        "lr_scheduler": "cosine",
        "mixed_precision": "fp16",
        "seed": 42,
        "clip_skip": 2,
        "max_token_length": 225,
        "noise_offset": 0.05,
        "min_snr_gamma": 5.0,
        "training_comment": "trigger: mychar",
        "sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "sd_model_hash": "925997e9",
        "new_sd_model_hash": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "vae_name": "vae.safetensors",
        "vae_hash": "c6a580b1",
        "new_vae_hash": "ab" * 32,
        "session_id": 2890912883,
        "training_started_at": 1700000000.5,
        "training_finished_at": 1700003600.25,
        "stopped_early": True,
        "author": "me",
        "tags": ["a", "b"],
    }
    values.update(overrides)
    return kohya_metadata.TrainingInfo(**values)


def test_build_metadata_writes_kohyas_keys_as_strings():
    meta = kohya_metadata.build_metadata(full_info())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ss = {k for k in meta if k.startswith("ss_")}
    # every kohya key we have a value for; ss_datasets belongs to kohya's --dataset_config branch
    assert ss == ALL_SS_KEYS - {"ss_datasets"}
    assert meta["ss_output_name"] == "my_lora"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "16"
    assert meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert meta["ss_resolution"] == "(512, 768)"
    assert meta["ss_v2"] == "False"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dropout"] == "None"
    assert meta["ss_seed"] == "42"
    assert meta["ss_steps"] == "1000"
    assert meta["ss_epoch"] == "5"
    assert meta["ss_training_finished_at"] == "1700003600.25"
    assert meta["ss_session_id"] == "2890912883"
    assert meta["ss_max_token_length"] == "225"
    assert meta["ss_training_comment"] == "trigger: mychar"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_mychar": {"mychar": 40, "1girl": 38}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_mychar": {"n_repeats": 10, "img_count": 40}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [512, 512], "count": 400}
    assert meta["ss_sd_model_hash"] == "925997e9"
    assert meta["ss_vae_name"] == "vae.safetensors"
    assert meta["ss_total_batch_size"] == "1"
    assert meta["lora_train.stopped_early"] == "True"
    assert meta["modelspec.resolution"] == "512x768"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.author"] == "me"
    assert meta["modelspec.tags"] == "a, b"
    assert meta["modelspec.implementation_version"].startswith("sd-webui-lora-train/")
    assert meta["modelspec.date"].startswith("2023-11-1")


def test_build_metadata_defaults_follow_kohya():
    meta = kohya_metadata.build_metadata(
        kohya_metadata.TrainingInfo(family="sd1", output_name="x", max_token_length=75)
    )
    assert "ss_network_args" not in meta  # kohya writes it only with --network_args
    for key in ("ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name", "ss_vae_name", "ss_vae_hash"):
        assert key not in meta
    assert meta["ss_max_token_length"] == "None"
    assert meta["ss_clip_skip"] == "None"
    assert meta["ss_network_alpha"] == "1.0"
    assert "modelspec.encoder_layer" not in meta
    assert "modelspec.author" not in meta
    assert meta["lora_train.stopped_early"] == "False"


def test_build_metadata_minimal_is_kohyas_no_metadata_set():
    meta = kohya_metadata.build_metadata(full_info(), minimal=True)
    ss = {k for k in meta if k.startswith("ss_")}
    assert ss == set(META_REF["minimum_keys_with_no_metadata"])
    assert any(k.startswith("modelspec.") for k in meta)


@pytest.mark.parametrize(
    ("family", "v_pred", "version", "v2", "example"),
    [
        ("sd1", False, "sd_v1", "False", "sd1"),
        ("sd1", True, "sd_v1_v", "False", None),
        ("sd2", False, "sd_v2", "True", None),
        ("sd2", True, "sd_v2_v", "True", "sd2_v"),
        ("sdxl", False, "sdxl_base_v1-0", "False", "sdxl"),
    ],
)
def test_family_markers_and_modelspec(family, v_pred, version, v2, example):
    meta = kohya_metadata.build_metadata(
        kohya_metadata.TrainingInfo(family=family, output_name="my_lora", v_prediction=v_pred)
    )
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")
    if example:
        expected = dict(META_REF["modelspec_keys"]["examples"][example])
        expected["modelspec.implementation_version"] = kohya_metadata.IMPLEMENTATION_VERSION
        got = {k: v for k, v in meta.items() if k.startswith("modelspec.") and k != "modelspec.date"}
        assert got == expected
    if family == "sd2" and not v_pred:
        assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
        assert meta["modelspec.resolution"] == "512x512"


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError):
        kohya_metadata.build_metadata(kohya_metadata.TrainingInfo(family="sd3", output_name="x"))


def test_optimizer_string():
    assert kohya_metadata.optimizer_string(torch.optim.AdamW) == "torch.optim.adamw.AdamW"
    assert (
        kohya_metadata.optimizer_string(torch.optim.AdamW, {"weight_decay": 0.1})
        == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    )
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert (
        kohya_metadata.optimizer_string(opt, ["momentum=0.9", "nesterov=True"])
        == "torch.optim.sgd.SGD(momentum=0.9,nesterov=True)"
    )


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
    ],
)
def test_save_load_round_trip(tmp_path, dtype, expected):
    sd = small_lora()
    meta = kohya_metadata.build_metadata(full_info())
    path = lora_file.save_lora(tmp_path / "out.safetensors", sd, meta, dtype=dtype)
    assert path == tmp_path / "out.safetensors"
    loaded, loaded_meta = lora_file.load_lora(path)
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == expected, key
        assert loaded[key].shape == value.shape
        assert torch.equal(loaded[key], value.to(expected))
    alpha = loaded["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.dim() == 0
    assert alpha.dtype == expected
    assert alpha.item() == 1.0
    assert {k: v for k, v in loaded_meta.items() if not k.startswith("sshs_")} == meta
    cast = {k: v.to(expected) for k, v in sd.items()}
    assert (loaded_meta["sshs_model_hash"], loaded_meta["sshs_legacy_hash"]) == hashes.compute_hashes(cast, meta)
    assert loaded_meta["sshs_model_hash"] == hashes.file_data_sha256(path)
    assert list(tmp_path.iterdir()) == [path]


def test_saved_hashes_match_kohya_definition_for_big_file(tmp_path):
    sd = big_lora()
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "modelspec.title": "t"}
    path = lora_file.save_lora(tmp_path / "big.safetensors", sd, meta, dtype=torch.float32)
    _, loaded_meta = lora_file.load_lora(path)
    buffer = safetensors.torch.save(sd, {"ss_network_dim": "4", "ss_network_alpha": "4.0"})
    assert loaded_meta["sshs_model_hash"] == hashes.hashes_from_bytes(buffer)[0] == hashes.file_data_sha256(path)
    assert loaded_meta["sshs_legacy_hash"] == hashes.hashes_from_bytes(buffer)[1] != "e3b0c442"
    # as the reference says: the legacy hash is not the one of the final file
    assert loaded_meta["sshs_legacy_hash"] != hashes.file_legacy_hash(path)


def test_save_accepts_gpu_style_inputs(tmp_path):
    sd = {k: v.t() if v.dim() == 2 else v for k, v in small_lora().items()}  # non-contiguous views
    sd["lora_unet_y.lora_down.weight"] = torch.zeros(2, 3, requires_grad=True)
    path = lora_file.save_lora(tmp_path / "a.safetensors", sd, {"ss_x": None, "ss_j": {"a": 1}})
    loaded, meta = lora_file.load_lora(path)
    assert meta["ss_x"] == "None"
    assert json.loads(meta["ss_j"]) == {"a": 1}
    assert torch.equal(loaded["lora_unet_y.lora_down.weight"], torch.zeros(2, 3, dtype=torch.float16))


def test_no_overwrite_picks_free_name(tmp_path):
    target = tmp_path / "my_lora.safetensors"
    first = lora_file.save_lora(target, small_lora(), {"ss_output_name": "a"})
    original = first.read_bytes()
    second = lora_file.save_lora(target, small_lora(), {"ss_output_name": "b"})
    third = lora_file.save_lora(target, small_lora(), {"ss_output_name": "c"})
    assert (first, second, third) == (
        target,
        tmp_path / "my_lora_1.safetensors",
        tmp_path / "my_lora_2.safetensors",
    )
    assert target.read_bytes() == original
    assert lora_file.load_lora(third)[1]["ss_output_name"] == "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "my_lora.safetensors",
        "my_lora_1.safetensors",
        "my_lora_2.safetensors",
    ]


def test_overwrite_replaces(tmp_path):
    target = tmp_path / "my_lora.safetensors"
    lora_file.save_lora(target, small_lora(), {"ss_output_name": "a"})
    assert lora_file.save_lora(target, small_lora(), {"ss_output_name": "b"}, overwrite=True) == target
    assert lora_file.load_lora(target)[1]["ss_output_name"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["my_lora.safetensors"]


def test_no_clobber_falls_back_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(atomic_write.os, "link", no_links)
    target = tmp_path / "x.safetensors"
    lora_file.save_lora(target, small_lora(), {"ss_output_name": "a"})
    assert lora_file.save_lora(target, small_lora(), {"ss_output_name": "b"}) == tmp_path / "x_1.safetensors"
    assert lora_file.load_lora(target)[1]["ss_output_name"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "x_1.safetensors"]


def test_free_path(tmp_path):
    assert atomic_write.free_path(tmp_path / "a.safetensors") == tmp_path / "a.safetensors"
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "a_1.safetensors").write_bytes(b"")
    assert atomic_write.free_path(tmp_path / "a.safetensors") == tmp_path / "a_2.safetensors"


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("failure", ["mid_write", "fsync", "replace", "interrupt"])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, overwrite, failure):
    target = tmp_path / "my_lora.safetensors"
    lora_file.save_lora(target, small_lora(), {"ss_output_name": "old"})
    before = listing(tmp_path)

    if failure in ("mid_write", "interrupt"):
        real = lora_file.write_temp
        error = KeyboardInterrupt if failure == "interrupt" else OSError("disk full")

        def breaking(directory, stem, chunks):
            def gen():
                for i, chunk in enumerate(chunks):
                    if i == 1:
                        raise error
                    yield chunk

            return real(directory, stem, gen())

        monkeypatch.setattr(lora_file, "write_temp", breaking)
        expected = KeyboardInterrupt if failure == "interrupt" else OSError
    elif failure == "fsync":

        def bad_fsync(fd):
            raise OSError("I/O error")

        monkeypatch.setattr(atomic_write.os, "fsync", bad_fsync)
        expected = OSError
    else:

        def bad_move(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(atomic_write.os, "replace", bad_move)
        monkeypatch.setattr(atomic_write.os, "link", bad_move)
        expected = OSError

    with pytest.raises(expected):
        lora_file.save_lora(target, small_lora(), {"ss_output_name": "new"}, overwrite=overwrite)
    assert listing(tmp_path) == before  # no temp file, no partial file, old file untouched


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        lora_file.save_lora(tmp_path / "a.safetensors", small_lora(), {}, dtype=torch.int8)
    with pytest.raises(ConfigError):
        lora_file.save_lora(tmp_path / "a.safetensors", small_lora(), {}, dtype="fp8")
    with pytest.raises(LoraFileError, match="safetensors"):
        lora_file.save_lora(tmp_path / "a.pt", small_lora(), {})
    with pytest.raises(LoraFileError, match="empty"):
        lora_file.save_lora(tmp_path / "a.safetensors", {}, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ damaged files


@pytest.fixture
def good_file(tmp_path) -> Path:
    return lora_file.save_lora(tmp_path / "good.safetensors", small_lora(), {"ss_output_name": "x"})


def _rewrite_header(raw: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _set_first(key_part, field, value):
    def change(header):
        name = next(k for k in header if k.endswith(key_part))
        header[name][field] = value

    return change


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda raw: b"", "empty"),
        (lambda raw: raw[:5], "not a safetensors file"),
        (lambda raw: raw[:40], "truncated"),
        (lambda raw: raw[: len(raw) - 100], "truncated"),
        (lambda raw: raw + b"\0" * 16, "unexpected bytes"),
        (lambda raw: os.urandom(64) + b"garbage" * 100, "not a safetensors file"),
        (lambda raw: b"hello, I am a text file and certainly not a LoRA\n" * 20, "not a safetensors file"),
        (lambda raw: struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 32, "not valid JSON"),
        (lambda raw: _rewrite_header(raw, _set_first("lora_down.weight", "shape", [4, 4])), "needs"),
        (lambda raw: _rewrite_header(raw, _set_first("lora_up.weight", "data_offsets", [0, 10**9])), "damaged"),
        (lambda raw: _rewrite_header(raw, _set_first("alpha", "dtype", "F99")), "bad entry"),
        (lambda raw: _rewrite_header(raw, lambda h: h.update({"__metadata__": {"a": 1}})), "__metadata__"),
    ],
    ids=[
        "empty",
        "tiny",
        "cut_in_header",
        "cut_in_data",
        "trailing_bytes",
        "random",
        "text",
        "header_not_json",
        "shape_lies",
        "offsets_lie",
        "bad_dtype",
        "bad_metadata",
    ],
)
def test_damaged_files_raise_clear_errors(tmp_path, good_file, make, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(make(good_file.read_bytes()))
    with pytest.raises(LoraFileError, match=message) as info:
        lora_file.load_lora(bad)
    assert "bad.safetensors" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(LoraFileError, match="not found"):
        lora_file.load_lora(tmp_path / "nope.safetensors")


def test_pickles_are_refused(tmp_path):
    sd = small_lora()
    torch.save(sd, tmp_path / "lora.pt")
    with pytest.raises(LoraFileError, match=r"(?i)pickle.*convert it to \.safetensors"):
        lora_file.load_lora(tmp_path / "lora.pt")
    torch.save(sd, tmp_path / "disguised.safetensors")  # zip-format torch.save under a wrong name
    with pytest.raises(LoraFileError, match="zip archive"):
        lora_file.load_lora(tmp_path / "disguised.safetensors")
    torch.save(sd, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    with pytest.raises(LoraFileError, match="pickle"):
        lora_file.load_lora(tmp_path / "legacy.safetensors")


def test_non_lora_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LoraFileError, match="not a LoRA"):
        lora_file.load_lora(path)
    safetensors.torch.save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoraFileError, match="no tensors"):
        lora_file.load_lora(tmp_path / "empty.safetensors")


def test_load_kohya_file_without_metadata(tmp_path):
    path = tmp_path / "k.safetensors"
    sd = small_lora(torch.float16)
    safetensors.torch.save_file(sd, str(path))
    loaded, meta = lora_file.load_lora(path)
    assert meta == {}
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


# ------------------------------------------------------------------ resume state


def assert_same(a, b, where="state"):
    """Strict structural equality: same types (tuple vs list, int vs float), same dtypes and values."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for (ka, va), kb in zip(a.items(), b.keys(), strict=True):
            assert type(ka) is type(kb), f"{where} key {ka!r}"
            assert_same(va, b[kb], f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def _training_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(3, 4, generator=g)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_flatten_round_trip_optimizer_scheduler_rng(tmp_path):
    model, optimizer, scheduler = _training_objects()
    _train(model, optimizer, scheduler, 3, seed=1)
    random.seed(5)
    np.random.seed(6)
    generator = np.random.default_rng(7)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "numpy_generator": generator.bit_generator.state,
        "model": model.state_dict(),
        "step": 3,
    }
    tensors, skeleton = resume_state.flatten_tensors(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    json.dumps(skeleton, allow_nan=False)  # plain JSON
    assert_same(resume_state.unflatten_tensors(tensors, skeleton), state)

    resume_state.save_state(tmp_path / "resume", state, info={"epoch": 1})
    restored, info = resume_state.load_state(tmp_path / "resume")
    assert info == {"epoch": 1}
    assert_same(restored, state)
    assert isinstance(restored["optimizer"]["state"], dict)
    assert 0 in restored["optimizer"]["state"]
    assert isinstance(restored["optimizer"]["param_groups"][0]["betas"], tuple)
    assert isinstance(restored["model"], collections.OrderedDict)

    # the restored RNG states continue the same streams
    expected = (torch.rand(3), random.random(), np.random.rand(), generator.random())
    torch.set_rng_state(restored["torch_rng"])
    random.setstate(restored["python_rng"])
    np.random.set_state(restored["numpy_rng"])
    generator2 = np.random.default_rng()
    generator2.bit_generator.state = restored["numpy_generator"]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert generator2.random() == expected[3]

    # the restored optimizer/scheduler continue training exactly like the originals
    model2, optimizer2, scheduler2 = _training_objects()
    model2.load_state_dict(restored["model"])
    optimizer2.load_state_dict(restored["optimizer"])
    scheduler2.load_state_dict(restored["scheduler"])
    _train(model, optimizer, scheduler, 2, seed=9)
    _train(model2, optimizer2, scheduler2, 2, seed=9)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_flatten_edge_cases():
    shared = torch.arange(6, dtype=torch.int64)
    state = {
        0: (1, 2.5, None, True, "s"),
        1: [1, 2],
        (2, "x"): {"nested": {3.5: "float key", None: "none key", False: "bool key"}},
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e-300],
        "big": 2**200,
        "np": (np.float64(1.5), np.int32(-3), np.bool_(True), np.zeros((2, 0, 3), dtype=np.uint32)),
        "tensors": (shared, shared, shared[2:4], torch.tensor(True), torch.zeros(0, 3, dtype=torch.bfloat16)),
        "types": (torch.float16, torch.device("cpu"), torch.Size([2, 3])),
        "looks_tagged": {"$tensor": "t0", "$tuple": [1]},
    }
    tensors, skeleton = resume_state.flatten_tensors(state)
    out = resume_state.unflatten_tensors(tensors, skeleton)
    assert_same(out, state)
    assert out["tensors"][0] is out["tensors"][1]  # one tensor object stays one
    assert len(tensors) == 4 + 1  # shared stored once; the view separately; + the numpy array


def test_flatten_refuses_what_would_need_pickle():
    with pytest.raises(TypeError, match="without pickle"):
        resume_state.flatten_tensors({"a": [object()]})
    with pytest.raises(TypeError):
        resume_state.flatten_tensors({"a": np.array([object()])})


def test_unflatten_rejects_bad_skeleton():
    with pytest.raises(ValueError, match="missing"):
        resume_state.unflatten_tensors({}, {"$tensor": "t0"})
    with pytest.raises(ValueError, match=r"malformed state skeleton node"):
        resume_state.unflatten_tensors({}, {"what": 1})


def test_state_pair_is_committed_by_the_json(tmp_path, monkeypatch):
    directory = tmp_path / "state"
    resume_state.save_state_dict_and_json(directory, {"a": torch.ones(3)}, {"step": 1})
    real = resume_state.atomic_write_bytes

    def fail_on_json(path, chunks, *, overwrite=True):
        if str(path).endswith(".json"):
            raise OSError("disk full")
        return real(path, chunks, overwrite=overwrite)

    monkeypatch.setattr(resume_state, "atomic_write_bytes", fail_on_json)
    with pytest.raises(OSError, match=r"disk full"):
        resume_state.save_state_dict_and_json(directory, {"a": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, info = resume_state.load_state_dict_and_json(directory)
    assert info == {"step": 1}
    assert torch.equal(tensors["a"], torch.ones(3))
    assert len(list(directory.glob("state-*.safetensors"))) == 1  # the orphan was removed

    resume_state.save_state_dict_and_json(directory, {"a": torch.zeros(3)}, {"step": 3})
    tensors, info = resume_state.load_state_dict_and_json(directory)
    assert info == {"step": 3}
    assert torch.equal(tensors["a"], torch.zeros(3))
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("state-")) == ["state.json"]
    assert len(list(directory.glob("state-*.safetensors"))) == 1  # the old tensors file is gone


def test_state_errors(tmp_path):
    with pytest.raises(resume_state.StateFileError, match="no saved state"):
        resume_state.load_state_dict_and_json(tmp_path)
    resume_state.save_state_dict_and_json(tmp_path, {"a": torch.ones(1)}, {})
    (tmp_path / "state.json").write_text("{broken")
    with pytest.raises(resume_state.StateFileError, match="damaged"):
        resume_state.load_state_dict_and_json(tmp_path)
    # a tensors file from another save
    resume_state.save_state_dict_and_json(tmp_path, {"a": torch.ones(1)}, {}, name="one")
    resume_state.save_state_dict_and_json(tmp_path, {"a": torch.ones(1)}, {}, name="two")
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    one["tensors_file"] = two["tensors_file"]
    (tmp_path / "one.json").write_text(json.dumps(one))
    with pytest.raises(resume_state.StateFileError, match="different save"):
        resume_state.load_state_dict_and_json(tmp_path, name="one")
    # truncated tensors file
    tensors_file = tmp_path / two["tensors_file"]
    tensors_file.write_bytes(tensors_file.read_bytes()[:-2])
    with pytest.raises(resume_state.StateFileError, match="truncated"):
        resume_state.load_state_dict_and_json(tmp_path, name="two")
    with pytest.raises(TypeError, match="JSON"):
        resume_state.save_state_dict_and_json(tmp_path, {}, {"x": object()})


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    """A finished file is as readable as any file the user writes (mkstemp alone makes it 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    target = atomic_write.atomic_write_bytes(tmp_path / "lora.safetensors", b"data")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"data")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
