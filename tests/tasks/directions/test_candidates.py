import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.core.errors import CompalignError
from tasks.directions.candidates import (
    check_direction,
    difference_of_means,
    interpolate_layer,
    load_direction,
)
from tasks.directions.collect import ActivationSums


def _sums(seed: int, count: int = 4) -> ActivationSums:
    g = torch.Generator().manual_seed(seed)
    return ActivationSums(sums=torch.randn(3, 2, 8, generator=g, dtype=torch.float64) * count, count=count)


def test_difference_of_means_is_unit_and_projected_is_orthogonal():
    target, baseline = _sums(0), _sums(1)
    plain = difference_of_means(target, baseline)
    expected = target.mean() - baseline.mean()
    assert torch.allclose(
        plain.directions.double(), expected / expected.norm(dim=-1, keepdim=True), atol=1e-6
    )
    assert torch.allclose(plain.norms.double(), expected.norm(dim=-1), atol=1e-5)
    proj = difference_of_means(target, baseline, projected=True)
    base = baseline.mean()
    assert (proj.directions.double() * base).sum(-1).abs().max() < 1e-6
    assert torch.allclose(proj.directions.norm(dim=-1), torch.ones(3, 2))


def test_get_interpolate_and_errors():
    cands = difference_of_means(_sums(0), _sums(1))
    assert torch.equal(cands.get(1, -1), cands.directions[1, 1])
    assert torch.allclose(interpolate_layer(cands, 1.0, -2), cands.get(1, -2))
    mid = interpolate_layer(cands, 0.5, -1)
    assert mid.norm() == pytest.approx(1.0)
    with pytest.raises(CompalignError, match="out of range"):
        cands.get(3, -1)
    with pytest.raises(CompalignError, match="outside"):
        cands.get(0, -3)


def test_direction_files(tmp_path):
    save_file(
        {"direction": torch.ones(8)}, tmp_path / "d.safetensors", metadata={"layer": "4", "position": "-1"}
    )
    direction, meta = load_direction(str(tmp_path / "d.safetensors"), 8)
    assert direction.norm() == pytest.approx(1.0) and meta["layer"] == "4"
    torch.save(torch.ones(8), tmp_path / "d.pt")
    assert load_direction(str(tmp_path / "d.pt"), 8)[0].shape == (8,)
    with pytest.raises(CompalignError, match="hidden size is 9"):
        load_direction(str(tmp_path / "d.safetensors"), 9)
    with pytest.raises(CompalignError, match="does not exist"):
        load_direction(str(tmp_path / "none.safetensors"), 8)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CompalignError, match="cannot read"):
        load_direction(str(tmp_path / "bad.safetensors"), 8)
    with pytest.raises(CompalignError, match="all zeros"):
        check_direction(torch.zeros(8), 8)


def test_layer_weights_of_a_sweep_trial_file(tmp_path):
    from tasks.directions.candidates import load_layer_weights

    r = torch.ones(8) / 8**0.5
    plain = tmp_path / "plain.safetensors"
    save_file({"direction": r}, plain)
    assert load_layer_weights(str(plain), 3) is None
    assert load_layer_weights(str(tmp_path / "d.pt"), 3) is None  # only safetensors carry kernels

    trial = tmp_path / "trial.safetensors"
    save_file({"direction": r, "attn_weights": torch.ones(3), "mlp_weights": torch.zeros(3)}, trial,
              {"embed_weight": "0.5"})  # fmt: skip
    weights = load_layer_weights(str(trial), 3)
    assert weights.embed == 0.5 and weights.attn.tolist() == [1, 1, 1] and weights.mlp.tolist() == [0, 0, 0]
    with pytest.raises(CompalignError, match="model has 4 layers"):
        load_layer_weights(str(trial), 4)

    half = tmp_path / "half.safetensors"
    save_file({"direction": r, "attn_weights": torch.ones(3)}, half)
    with pytest.raises(CompalignError, match="but not the other one"):
        load_layer_weights(str(half), 3)
    nan = tmp_path / "nan.safetensors"
    save_file(
        {"direction": r, "attn_weights": torch.ones(3), "mlp_weights": torch.full((3,), float("nan"))}, nan
    )
    with pytest.raises(CompalignError, match="NaN"):
        load_layer_weights(str(nan), 3)


def _exact(message: str):
    return pytest.raises(CompalignError, match="^" + re.escape(message) + "$")


def test_index_bounds_are_exact():
    cands = difference_of_means(_sums(0), _sums(1))  # 3 layers, 2 positions
    assert cands.position_index(-2) == 0 and cands.position_index(-1) == 1
    for position in (0, -3):
        with _exact(f"position {position} is outside -2..-1"):
            cands.position_index(position)
    assert torch.equal(cands.get(0, -2), cands.directions[0, 0]) and torch.equal(
        cands.get(2, -1), cands.directions[2, 1]
    )
    for layer in (-1, 3):
        with _exact(f"layer {layer} is out of range: candidates exist for layers 0..2"):
            cands.get(layer, -1)


def test_fractional_layers_blend_their_two_neighbours():
    cands = difference_of_means(_sums(0), _sums(1))
    for layer, low, frac in ((0.25, 0, 0.25), (1.75, 1, 0.75), (1.5, 1, 0.5)):
        blend = (1 - frac) * cands.get(low, -1) + frac * cands.get(low + 1, -1)
        assert torch.allclose(interpolate_layer(cands, layer, -1), blend / blend.norm(), atol=1e-6)
    assert torch.allclose(interpolate_layer(cands, 0.0, -1), cands.get(0, -1))
    assert torch.allclose(
        interpolate_layer(cands, 2.0, -1), cands.get(2, -1)
    )  # the last layer: no neighbour above
    for layer in (-0.01, 2.01, float("nan")):
        with _exact(f"layer {layer} is out of range 0..2"):
            interpolate_layer(cands, layer, -1)


def test_small_differences_are_still_unit_directions():
    """Means closer than 1 apart (bf16 activations of a small model): the directions are still unit vectors,
    and the projection removes the baseline mean's component whatever its norm."""
    target, baseline = _sums(0), _sums(1)
    tiny_t = ActivationSums(sums=target.sums * 1e-3, count=target.count)
    tiny_b = ActivationSums(sums=baseline.sums * 1e-3, count=baseline.count)
    for projected in (False, True):
        cands = difference_of_means(tiny_t, tiny_b, projected=projected)
        assert torch.allclose(cands.directions.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    proj = difference_of_means(tiny_t, tiny_b, projected=True)
    assert (proj.directions.double() * tiny_b.mean()).sum(-1).abs().max() < 1e-9
    equal = difference_of_means(target, target)
    assert torch.equal(equal.directions, torch.zeros(3, 2, 8)) and torch.equal(equal.norms, torch.zeros(3, 2))


def test_direction_file_messages_name_the_file(tmp_path):
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.ones(8), "b": torch.ones(8)}, two)
    with _exact(f"{two} holds tensors ['a', 'b']; expected one named 'direction'"):
        load_direction(str(two), 8)
    one = tmp_path / "one.safetensors"
    save_file({"vector": torch.ones(1, 8)}, one)  # one tensor under another name, (1, hidden): taken
    direction, _ = load_direction(str(one), 8)
    assert torch.allclose(direction, torch.ones(8) / 8**0.5)
    (tmp_path / "d.txt").write_text("1 2 3")
    with _exact(f"direction file {tmp_path / 'd.txt'}: use .safetensors, .pt or .npy"):
        load_direction(str(tmp_path / "d.txt"), 8)
    torch.save({"direction": torch.ones(8)}, tmp_path / "dict.pt")
    with _exact(f"direction file {tmp_path / 'dict.pt'} does not hold a tensor"):
        load_direction(str(tmp_path / "dict.pt"), 8)
    import numpy as np

    np.save(tmp_path / "d.npy", np.full(8, 2.0, dtype=np.float32))
    assert torch.allclose(load_direction(str(tmp_path / "d.npy"), 8)[0], torch.ones(8) / 8**0.5)
    with _exact("direction contains NaN or infinite values"):
        check_direction(torch.tensor([1.0, float("inf")]), 2)
    with _exact("direction has shape (3,) but the model's hidden size is 2"):
        check_direction(torch.ones(3), 2)


def test_layer_weight_file_errors_are_exact(tmp_path):
    from tasks.directions.candidates import load_layer_weights

    half = tmp_path / "half.safetensors"
    save_file({"direction": torch.ones(8), "attn_weights": torch.ones(3)}, half)
    with _exact(f"{half} has attn_weights but not the other one of attn_weights / mlp_weights"):
        load_layer_weights(str(half), 3)
    bad = tmp_path / "bad.safetensors"
    save_file({"attn_weights": torch.ones(3), "mlp_weights": torch.tensor([1.0, float("nan"), 0.0])}, bad)
    with _exact(f"{bad}: mlp_weights contains NaN or infinite values"):
        load_layer_weights(str(bad), 3)
    text = tmp_path / "text.safetensors"
    save_file({"attn_weights": torch.ones(3), "mlp_weights": torch.ones(3)}, text, {"embed_weight": "x"})
    with _exact(f"{text}: embed_weight metadata 'x' is not a number"):
        load_layer_weights(str(text), 3)
    plain = tmp_path / "plain.safetensors"
    save_file({"attn_weights": torch.ones(3), "mlp_weights": torch.ones(3)}, plain)
    assert load_layer_weights(str(plain), 3).embed == 1.0  # no metadata: the embeddings fully


def test_which_tensor_of_a_file_is_the_direction(tmp_path):
    both = tmp_path / "both.safetensors"
    save_file({"a_norms": torch.zeros(8), "direction": torch.ones(8)}, both)  # the named one, not the first
    direction, metadata = load_direction(str(both), 8)
    assert torch.allclose(direction, torch.ones(8) / 8**0.5) and metadata == {}
    torch.save(torch.full((8,), 3.0), tmp_path / "d.pt")
    assert load_direction(str(tmp_path / "d.pt"), 8)[1] == {}  # a .pt file carries no metadata
    wide = tmp_path / "wide.safetensors"
    save_file({"direction": torch.ones(2, 8)}, wide)  # two rows are not one direction of width 16
    with _exact("direction has shape (2, 8) but the model's hidden size is 16"):
        load_direction(str(wide), 16)
    torch.save(Path("not/a/tensor"), tmp_path / "object.pt")  # pickled code is never run: refused
    with pytest.raises(
        CompalignError, match=f"^cannot read direction file {re.escape(str(tmp_path / 'object.pt'))}: "
    ):
        load_direction(str(tmp_path / "object.pt"), 8)
    with _exact("direction is all zeros"):
        check_direction(torch.zeros(8), 8)
