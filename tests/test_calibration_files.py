"""Calibration files: samples that share tensor objects, lists and tuples (Qwen-Image ``img_shapes``,
Z-Image's lists of latents) survive ``save_calibration`` → ``load_calibration`` exactly."""

from __future__ import annotations

import torch

from converters.quantize import load_calibration, save_calibration


def test_shared_tensors_and_views_are_saved(tmp_path):
    t = torch.tensor([500.0])  # one timestep object in every sample, as a pipeline loop passes it
    batch = torch.randn(2, 4, 8)  # samples that are views of one batch tensor
    samples = [{"timestep": t, "hidden_states": batch[0], "mask": None},
               {"timestep": t, "hidden_states": batch[1], "mask": None}]
    back = load_calibration(save_calibration(samples, tmp_path / "c.safetensors")).samples
    assert len(back) == 2
    for got, want in zip(back, samples):
        assert torch.equal(got["timestep"], t) and torch.equal(got["hidden_states"], want["hidden_states"])
        assert got["mask"] is None


def test_lists_tuples_and_nesting_round_trip(tmp_path):
    latents = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    sample = {"x": latents, "img_shapes": [[(1, 4, 4)]], "kw": {"scale": 1.5, "ids": (torch.arange(3), 7)}}
    (back,) = load_calibration(save_calibration([sample], tmp_path / "c.safetensors")).samples
    assert isinstance(back["x"], list) and len(back["x"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(back["x"], latents))
    assert back["img_shapes"] == [[(1, 4, 4)]]
    assert back["kw"]["scale"] == 1.5 and isinstance(back["kw"]["ids"], tuple)
    assert torch.equal(back["kw"]["ids"][0], torch.arange(3)) and back["kw"]["ids"][1] == 7
