"""fastppo.train.safestate: a trainer state round-trips through JSON + safetensors exactly, and
nothing that is not such a state (a pickle, a damaged file, a crafted structure) is accepted."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest
import torch

from fastppo.train import safestate


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def _state(rng: torch.Generator) -> dict:
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 5, generator=rng)).pow(2).sum().backward()
    opt.step()
    version, internal, gauss = random.getstate()
    return {"format": 3, "optimizer": opt.state_dict(), "gen": rng.get_state(),
            "python": [version, list(internal), gauss], "nan": float("nan"), "inf": -math.inf,
            "tuple": (1, 2.5, None, "x"), "int_keys": {7: "a", 2: [True, None]},
            "looks_like_a_marker": {"__tensor__": "t0"}, "bf16": torch.randn(3, generator=rng).bfloat16()}


def test_round_trip_is_exact_key_types_and_tuples_included(tmp_path, rng):
    state = _state(rng)
    safestate.save(state, str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))
    back = safestate.load(str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))
    assert safestate.equal(state, back)
    assert list(back["optimizer"]["state"]) == [0, 1]  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert back["looks_like_a_marker"] == {"__tensor__": "t0"}  # a user's dict is not a reference
    # The loaded optimizer state is usable as such.
    model = torch.nn.Linear(5, 3)
    torch.optim.AdamW(model.parameters()).load_state_dict(back["optimizer"])
    # equal() is not vacuous
    changed = dict(back, nan=0.0)
    assert not safestate.equal(state, changed)


@pytest.mark.parametrize("victim", ["json", "safetensors"])
def test_a_pickle_in_either_file_is_refused_never_run(tmp_path, rng, victim):
    state = _state(rng)
    paths = {"json": str(tmp_path / "s.json"), "safetensors": str(tmp_path / "s.safetensors")}
    safestate.save(state, paths["json"], paths["safetensors"])
    marker = tmp_path / "PWNED"
    with open(paths[victim], "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(safestate.StateFormatError):
        safestate.load(paths["json"], paths["safetensors"])
    torch.save({"payload": Payload(marker)}, paths[victim])  # torch's zip container too
    with pytest.raises(safestate.StateFormatError):
        safestate.load(paths["json"], paths["safetensors"])
    assert not marker.exists()


@pytest.mark.parametrize("tree, why", [
    ({"a": {"__tensor__": "missing"}}, "lacks"),
    ({"a": {"__map__": [[1]]}}, "pair"),
    ({"a": {"__tensor__": "t0", "b": 1}}, "malformed"),
    ([1, 2], "JSON object"),
], ids=["unknown-tensor", "bad-map", "marker-with-extra-keys", "not-an-object"])
def test_crafted_structures_are_refused(tmp_path, tree, why):
    from safetensors.torch import save_file

    save_file({"t0": torch.zeros(1)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(tree))
    with pytest.raises(safestate.StateFormatError, match=why):
        safestate.load(str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"t0": torch.zeros(1)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text('{"a": 1, "a": 2}')
    with pytest.raises(safestate.StateFormatError, match="repeats"):
        safestate.load(str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(safestate.StateFormatError):
        safestate.load(str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))


def test_objects_that_are_not_plain_values_cannot_be_written(tmp_path):
    with pytest.raises(TypeError, match="Payload"):
        safestate.save({"x": Payload(tmp_path / "m")}, str(tmp_path / "s.json"), str(tmp_path / "s.safetensors"))
