import numpy as np
import torch

from compress.record import Codebook
from compress.stages import State
from compress.stages import kmeans, prune
from compress.train import Optimizer, TrainConfig

from tests.stage_helpers import TinyNet, tiny_context, tiny_data


def pruned_model(tmp_path):
    torch.manual_seed(0)
    model, state = TinyNet(), State()
    prune.run(model, state, prune.PruneConfig(sparsity=0.7, retrain=TrainConfig(epochs=0)), tiny_context(tmp_path))
    return model, state


def test_kmeans_leaves_at_most_2_bits_values_and_zeros_stay_zero(tmp_path):
    model, state = pruned_model(tmp_path)
    cfg = kmeans.KMeansConfig(bits=3, finetune=TrainConfig(epochs=0), layers={"conv.*": {"bits": 2}})
    kmeans.run(model, state, cfg, tiny_context(tmp_path))
    for name, p in model.named_parameters():
        if name not in state.masks:
            continue
        mask = state.masks[name]
        assert torch.all(p[~mask] == 0)
        limit = 4 if name == "conv.weight" else 8
        assert torch.unique(p[mask]).numel() <= limit
        assert torch.equal(p.detach(), torch.from_numpy(state.records[name].to_dense()))


def test_kmeans_paper_default_bits_8_for_conv_5_for_fc():
    model = TinyNet()
    cfg = kmeans.KMeansConfig()
    assert cfg.bits_for(model, "conv.weight") == 8 and cfg.bits_for(model, "fc1.weight") == 5


def test_centroid_finetuning_changes_centroids_not_codes_or_masks(tmp_path):
    model, state = pruned_model(tmp_path)
    masks = {n: m.clone() for n, m in state.masks.items()}
    ctx = tiny_context(tmp_path, tiny_data())
    no_ft = kmeans.KMeansConfig(bits=3, finetune=TrainConfig(epochs=0))
    clustered = TinyNet()
    clustered.load_state_dict(model.state_dict())
    s0 = State(masks={n: m.clone() for n, m in masks.items()})
    kmeans.run(clustered, s0, no_ft, ctx)
    ft = kmeans.KMeansConfig(bits=3, finetune=TrainConfig(epochs=3, lr=1e-2, optimizer=Optimizer.ADAM,
                                                             weight_decay=0.0))
    kmeans.run(model, state, ft, ctx)
    for name, r in state.records.items():
        assert np.array_equal(r.codes, s0.records[name].codes)
        assert np.array_equal(r.positions, s0.records[name].positions)
        assert torch.equal(state.masks[name], masks[name])
        assert isinstance(r.table, Codebook) and r.table.size == s0.records[name].table.size
        assert not np.array_equal(r.table.values, s0.records[name].table.values)


def test_centroid_gradient_is_the_sum_of_its_cluster_gradients():
    codes = torch.tensor([[0, 1, 1], [2, 0, 1]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    shared = kmeans.SharedWeight(np.array([0.5, -1.0, 2.0], dtype=np.float32), codes, mask)
    w = shared(torch.empty(0))
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (w * upstream).sum().backward()
    # centroid 0: positions (0,0) and (1,1) but (1,1) is pruned -> 1; centroid 1: 2+3+6; centroid 2: 4
    assert shared.codebook.grad.tolist() == [1.0, 11.0, 4.0]
    assert w[1, 1].item() == 0.0


def test_record_per_channel_with_empty_first_dimension_decodes_to_empty():
    from compress.record import Affine, TensorRecord

    r = TensorRecord((0, 3), np.zeros(0), np.zeros(0), Affine(np.zeros(0), np.zeros(0), 16, per_channel=True))
    assert r.to_dense().shape == (0, 3)
