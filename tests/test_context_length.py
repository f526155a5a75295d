"""max_token_length builds the WebUI's 77-token windows, each with its own BOS/EOS.

kohya's sd-scripts build one sequence of BOS + 225 + EOS (227 ids, padded) for
``max_token_length = 225`` even for a short caption and encode it in three 75-token slices
that share one BOS and one EOS. This trainer keeps the WebUI's layout instead, the one the
LoRA is used with at generation: only as many windows as the caption needs, each
``[bos, up to 75 ids, eos, pad ...]``.
"""

import dataclasses

import torch

from lora_trainer.config.groups import DatasetConfig
from lora_trainer.text import chunk_token_ids, encode_chunks

BOS, EOS, PAD = 49406, 49407, 0


def test_short_caption_at_225_is_one_77_token_window():
    ids = chunk_token_ids([[1, 2, 3]], bos_id=BOS, eos_id=EOS, pad_id=PAD, max_token_length=225)
    assert ids.shape == (1, 1, 77)  # not kohya's one 227-id sequence
    assert ids[0, 0, :5].tolist() == [BOS, 1, 2, 3, EOS]
    assert set(ids[0, 0, 5:].tolist()) == {PAD}


def test_every_chunk_has_its_own_bos_and_eos():
    caption = list(range(1, 161))  # 160 tokens: three chunks of 75, 75, 10
    ids = chunk_token_ids([caption, [7]], bos_id=BOS, eos_id=EOS, pad_id=PAD, max_token_length=225)
    assert ids.shape == (2, 3, 77)
    for c, part in enumerate((caption[:75], caption[75:150], caption[150:])):
        window = ids[0, c].tolist()
        assert window[: len(part) + 2] == [BOS, *part, EOS]
    # the short caption in the same batch: its own window, then empty [bos, eos, pad ...] windows
    assert ids[1, 0, :3].tolist() == [BOS, 7, EOS]
    assert ids[1, 1, :2].tolist() == [BOS, EOS]
    assert ids[1, 2, :2].tolist() == [BOS, EOS]
    # 225 caps the length: the 226th token is dropped, never a fourth window
    assert chunk_token_ids([list(range(1, 300))], bos_id=BOS, eos_id=EOS, max_token_length=225).shape == (1, 3, 77)


def test_windows_are_encoded_separately_and_joined():
    seen = []

    def encode(windows):
        seen.append(windows.shape)
        return windows.float().unsqueeze(-1).expand(-1, -1, 4)

    ids = chunk_token_ids([list(range(1, 101))], bos_id=BOS, eos_id=EOS, max_token_length=225)
    hidden = encode_chunks(encode, ids)
    assert seen == [torch.Size([2, 77])]  # two independent 77-id windows, not one 152- or 227-id sequence
    assert isinstance(hidden, torch.Tensor)
    assert hidden.shape == (1, 154, 4)
    assert hidden[0, 77, 0].item() == BOS  # the second window starts with its own BOS


def test_the_setting_help_says_how_long_captions_are_encoded():
    (field,) = [f for f in dataclasses.fields(DatasetConfig) if f.name == "max_token_length"]
    assert "77-token window" in field.metadata["help"]
    assert "kohya" in field.metadata["help"]
