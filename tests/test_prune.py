import torch
import pytest
from hypothesis import given, settings, strategies as st

from compress.errors import RecipeError
from compress.stages import State
from compress.stages.prune import PruneConfig, Scope, largest_masks, magnitude_mask, run, round_targets
from compress.train import TrainConfig

from tests.stage_helpers import TinyNet, tiny_context, tiny_data


def test_magnitude_mask_keeps_exact_count_of_largest():
    w = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.9, 0.2])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [False, True, True, False, True, False]


def test_magnitude_mask_ties_go_to_lower_index_and_never_revive():
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert magnitude_mask(w, 0.5).tolist() == [True, True, False, False]
    keep = torch.tensor([False, True, True, True])
    big = torch.tensor([9.0, 1.0, 2.0, 3.0])
    assert magnitude_mask(big, 0.5, keep).tolist() == [False, False, True, True]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(-4, 4), min_size=1, max_size=30), min_size=1, max_size=3),
       st.floats(0, 1), st.integers(0, 2 ** 30))
def test_largest_masks_is_a_stable_descending_sort(values, fraction, seed):
    # small integers (signs included): many ties, which a stable sort breaks by position
    weights = [torch.tensor(v, dtype=torch.float32) for v in values]
    g = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(len(v), generator=g) < 0.7 if i % 2 else None for i, v in enumerate(values)]
    n_keep = int(round(fraction * sum(map(len, values))))
    score = torch.cat([torch.where(k, w.abs(), -1.0) if k is not None else w.abs() for w, k in zip(weights, keeps)])
    order = torch.argsort(score.double(), descending=True, stable=True)
    expected = torch.zeros(len(score), dtype=torch.bool)
    expected[order[:n_keep]] = True
    expected &= torch.cat([k if k is not None else torch.ones(len(w), dtype=torch.bool) for w, k in zip(weights, keeps)])
    assert torch.equal(torch.cat(largest_masks(weights, keeps, n_keep)), expected)


def test_global_scope_prunes_the_smallest_across_tensors(tmp_path):
    model = TinyNet()
    with torch.no_grad():
        for i, p in enumerate(p for n, p in model.named_parameters() if n.endswith("weight")):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) + 100_000 * i)  # tensor i all above i-1
    state = State()
    cfg = PruneConfig(sparsity=0.5, scope=Scope.GLOBAL, retrain=TrainConfig(epochs=0))
    run(model, state, cfg, tiny_context(tmp_path))
    n = {k: m.numel() for k, m in state.masks.items()}
    kept = sum(int(m.sum()) for m in state.masks.values())
    assert kept == sum(n.values()) - round(0.5 * sum(n.values()))
    # conv (36 weights, smallest values) is pruned whole; fc2 (largest values) is kept whole
    assert not state.masks["conv.weight"].any() and state.masks["fc2.weight"].all()


def test_round_targets_shrink_density_geometrically():
    cfg = PruneConfig(sparsity=0.99, rounds=2)
    assert round_targets(cfg, 1)[0] == pytest.approx(0.9)
    assert round_targets(cfg, 2)[0] == pytest.approx(0.99)
    assert round_targets(PruneConfig(quality=2.0, rounds=4), 2) == (None, 1.0)


def test_prune_config_rejects_bad_values():
    with pytest.raises(RecipeError, match="sparsity"):
        PruneConfig(sparsity=1.5)
    with pytest.raises(RecipeError, match="exactly one"):
        PruneConfig(sparsity=0.5, quality=1.0)
    with pytest.raises(RecipeError, match="scope"):
        PruneConfig(quality=1.0, scope=Scope.GLOBAL)


def test_prune_reaches_per_layer_sparsity_and_pruned_weights_stay_zero_through_retraining(tmp_path):
    torch.manual_seed(0)
    model, state = TinyNet(), State()
    # momentum and weight decay would move a pruned weight if the mask were not held in every forward pass
    retrain = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=0.01)
    cfg = PruneConfig(sparsity=0.8, rounds=2, retrain=retrain, layers={"fc2.*": {"sparsity": 0.5}})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(model, state, cfg, tiny_context(tmp_path, tiny_data()))
    for name in ("conv.weight", "fc1.weight", "fc2.weight"):
        w, mask = dict(model.named_parameters())[name], state.masks[name]
        assert torch.all(w[~mask] == 0) and not torch.any(torch.signbit(w[~mask]))  # exact +0.0
        expected = 0.5 if name == "fc2.weight" else 0.8
        assert (~mask).float().mean().item() == pytest.approx(expected, abs=1 / mask.numel())
        assert not torch.equal(w[mask], before[name][mask])  # retraining did move the kept weights
    assert not hasattr(model.fc1, "parametrizations")  # masks baked in, model plain again


def test_prune_quality_threshold_uses_std(tmp_path):
    torch.manual_seed(0)
    model, state = TinyNet(), State()
    w = model.fc1.weight.detach().clone()
    run(model, state, PruneConfig(quality=1.0, retrain=TrainConfig(epochs=0)), tiny_context(tmp_path))
    assert torch.equal(state.masks["fc1.weight"], w.abs() >= w.std())


def test_prune_global_scope_hits_overall_sparsity(tmp_path):
    torch.manual_seed(0)
    model, state = TinyNet(), State()
    run(model, state, PruneConfig(sparsity=0.9, scope=Scope.GLOBAL, retrain=TrainConfig(epochs=0)),
        tiny_context(tmp_path))
    kept = sum(int(m.sum()) for m in state.masks.values())
    total = sum(m.numel() for m in state.masks.values())
    assert kept == total - round(0.9 * total)
    # one threshold: every kept weight is at least as large as every pruned one
    w = torch.cat([dict(model.named_parameters())[n].flatten() for n in state.masks])
    m = torch.cat([state.masks[n].flatten() for n in state.masks])
    assert w[m].abs().min() >= 0 and (w[m].abs().min() > 0)


def test_prune_pattern_matching_nothing_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="matches no"):
        run(TinyNet(), State(), PruneConfig(sparsity=0.5, retrain=TrainConfig(epochs=0),
                                            layers={"nope.*": {"sparsity": 0.1}}), tiny_context(tmp_path))
