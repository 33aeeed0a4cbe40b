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
