"""Tests of MPSMConfig / MPSMModel / MPSMEnsembleModel: each equation on small hand-checkable cases."""

import itertools
import math

import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel
from modeling_mpsm.modeling_mpsm import (
    MPSMKGIDLayer,
    MPSMDirectionRepresentation,
    MPSMDistanceRepresentation,
    MPSMSpatialKernels,
    MPSMSRGRStep,
    add_linear,
    chain_adjacency,
    cross_attention,
    linear_on_real_nodes,
    real_node_index,
    semantic_knowledge_graph,
    triplet_loss,
)

TINY = dict(img_dim=12, vocab_size=40, word_dim=8, embed_size=16, sim_dim=8)


def tiny_config(**overrides):
    return MPSMConfig(**{**TINY, **overrides})


def make_batch(batch=3, regions=5, words=6, img_dim=12, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x1y1 = torch.rand(batch, regions, 2, generator=generator) * 0.5
    wh = torch.rand(batch, regions, 2, generator=generator) * 0.5
    lengths = torch.tensor([words - i % 3 for i in range(batch)])
    attention_mask = (torch.arange(words)[None] < lengths[:, None]).long()
    input_ids = torch.randint(4, vocab, (batch, words), generator=generator) * attention_mask
    return dict(
        region_features=torch.randn(batch, regions, img_dim, generator=generator),
        boxes=torch.cat([x1y1, x1y1 + wh], -1),
        region_mask=torch.ones(batch, regions, dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        dependency_adjacency=chain_adjacency(attention_mask),
    )


def eval_model(**overrides):
    torch.manual_seed(0)
    return MPSMModel(tiny_config(**overrides)).eval()


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "name, value, message",
    [
        ("kgid_layers", -1, "kgid_layers"),
        ("alignment", "both", "alignment"),
        ("similarity", "cosine", "similarity"),
        ("lambda_softmax", 0.0, "lambda_softmax"),
        ("margin", -0.1, "margin"),
        ("embed_size", 1.5, "embed_size"),
        ("use_srgr", "yes", "use_srgr"),
        ("streams", "x", "streams"),
        ("loss_type", "hinge", "loss_type"),
        ("dropout", 1.0, "dropout"),
    ],
)
def test_config_rejects_bad_values(name, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{name: value})


def test_config_round_trip(tmp_path):
    config = tiny_config(similarity="joint", kgid_layers=2, streams="both")
    config.save_pretrained(tmp_path)
    loaded = MPSMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.perspectives == ("distance", "direction") and loaded.stream_names == ("t2i", "i2t")


# ----------------------------------------------------------------------------------------------------- eq 1-4
def test_spatial_kernels_use_polar_coordinates():
    kernels = MPSMSpatialKernels(tiny_config(num_spatial_kernels=1))
    with torch.no_grad():
        kernels.mean_rho.fill_(0.5)
        kernels.mean_theta.fill_(math.pi / 2)
        kernels.log_sigma_rho.fill_(0.0)
        kernels.log_sigma_theta.fill_(0.0)
        kernels.mixture_logits.fill_(0.0)
    # box centres (0.1, 0.1) and (0.6, 0.1): offset (0.5, 0) -> rho 0.5, theta = atan2(0.5, 0) = pi/2
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.5, 0.0, 0.7, 0.2]]])
    prior = kernels(boxes)
    assert prior[0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)  # exactly at the kernel mean
    # reverse offset: theta = -pi/2, a full pi away from the mean
    assert prior[0, 1, 0].item() == pytest.approx(math.exp(-0.5 * math.pi**2), abs=1e-6)
    # same box: rho 0, theta 0 -> ((0-0.5)^2 + (pi/2)^2) / -2
    assert prior[0, 0, 0].item() == pytest.approx(math.exp(-0.5 * (0.25 + (math.pi / 2) ** 2)), abs=1e-6)


def test_semantic_graph_columns_are_unit_norm_and_padding_is_zero():
    torch.manual_seed(0)
    nodes = torch.nn.functional.normalize(torch.randn(2, 4, 5), dim=-1)
    prior = torch.rand(2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    edges = semantic_knowledge_graph(nodes, prior, mask, lambda_softmax=9.0)
    norms = edges.norm(dim=1)
    assert torch.allclose(norms[0], torch.ones(4), atol=1e-6)
    assert torch.allclose(norms[1, :3], torch.ones(3), atol=1e-6)
    assert edges[1, 3].abs().sum() == 0 and edges[1, :, 3].abs().sum() == 0
    # hand-check one entry: r = softmax_j(9 x_i.x_j) over valid j, e = r * P, column-normalised
    relevance = torch.softmax(9.0 * nodes[1, :3] @ nodes[1, :3].T, dim=-1) * prior[1, :3, :3]
    expected = relevance / relevance.norm(dim=0, keepdim=True)
    assert torch.allclose(edges[1, :3, :3], expected, atol=1e-6)


def test_chain_adjacency_is_symmetric_with_self_loops():
    adjacency = chain_adjacency(torch.tensor([[1, 1, 1, 0]]))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(adjacency[0], expected)


# ----------------------------------------------------------------------------------------------------- eq 5-9
def trained_kgid_layer(seed=0, embed_size=16, rebuild_adjacency=True, **overrides):
    """A KGID layer with eq 8's branch W_kg, b moved off its zero initialisation (as after training)."""
    torch.manual_seed(seed)
    layer = MPSMKGIDLayer(tiny_config(embed_size=embed_size, **overrides), rebuild_adjacency=rebuild_adjacency)
    with torch.no_grad():
        torch.nn.init.normal_(layer.transform.weight, std=0.1)
        torch.nn.init.normal_(layer.transform.bias, std=0.1)
    return layer


def test_kgid_gate_in_unit_interval_and_adaptive_edges_masked():
    layer = trained_kgid_layer()
    nodes = torch.nn.functional.normalize(torch.randn(2, 5, 16), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    adjacency = layer.adaptive_adjacency(nodes, mask)
    assert torch.allclose(adjacency[0].sum(-1), torch.ones(5), atol=1e-6)  # eq 9 rows are softmax
    assert torch.allclose(adjacency[1, :2].sum(-1), torch.ones(2), atol=1e-6)
    assert adjacency[1, :, 2:].abs().sum() == 0 and adjacency[1, 2:].abs().sum() == 0
    out, gate = layer(nodes, None, mask)
    assert (gate >= 0).all() and (gate <= 1).all()
    assert (out < 0).any()  # linear shortcut of eq 8: nodes keep signed coordinates (no ReLU over the sum)
    assert out[1, 2:].abs().sum() == 0


def test_kgid_gate_is_not_a_constant_on_unit_norm_nodes():
    """Eq 6 reads unit-RMS coordinates: on l2-normalised nodes of width 1024 the gate spreads over (0, 1)."""
    layer = trained_kgid_layer(embed_size=1024, rebuild_adjacency=False)
    nodes = torch.nn.functional.normalize(torch.randn(1, 6, 1024), dim=-1)
    _, gate = layer(nodes, torch.eye(6)[None], torch.ones(1, 6, dtype=torch.bool))
    assert gate.std() > 0.1 and gate.max() - gate.min() > 0.4  # the paper's raw inputs: std 0.008 around 0.5


def test_kgid_layer_matches_hand_computation():
    layer = trained_kgid_layer(seed=1, embed_size=3, rebuild_adjacency=False)
    nodes = torch.rand(1, 2, 3)
    adjacency = torch.tensor([[[0.6, 0.8], [0.8, 0.6]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out, _ = layer(nodes, adjacency, mask)
    x = nodes[0]
    knowledge = 3 * torch.softmax(adjacency[0] @ x @ layer.propagation.weight.T, -1) * x  # eq 5, ρ = d·softmax
    unit = math.sqrt(3) / x.norm(dim=-1, keepdim=True)
    gate = torch.sigmoid((knowledge * unit) * (x * unit) + x * unit)  # eq 6
    gated = gate * knowledge + (1 - gate) * x  # eq 7
    expected = x + gated @ layer.transform.weight.T + layer.transform.bias  # eq 8
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    layer.use_gate = False  # ablation: V_kg = V_k
    out, gate = layer(nodes, adjacency, mask)
    torch.testing.assert_close(out[0], x + knowledge @ layer.transform.weight.T + layer.transform.bias)
    assert torch.equal(gate, torch.ones_like(gate))


def test_kgid_is_the_identity_at_initialisation():
    model = eval_model(kgid_layers=3)
    for kgid in (model.visual_kgid, model.textual_kgid):
        for layer in kgid.layers:
            assert layer.transform.weight.abs().sum() == 0 and layer.transform.bias.abs().sum() == 0
        assert layer.propagation.weight.abs().sum() > 0  # the other weights are not zeroed
    nodes = torch.nn.functional.normalize(torch.randn(2, 5, 16), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    nodes = nodes * mask.unsqueeze(-1)
    graph = semantic_knowledge_graph(nodes, torch.rand(2, 5, 5), mask, 9.0)
    torch.testing.assert_close(model.visual_kgid(nodes, graph, mask)[0], nodes, atol=1e-6, rtol=0)


def test_kgid_knowledge_is_of_the_order_of_the_node():
    """‖V_k‖ / ‖X‖ of order 1 at paper width (a plain softmax over features would give 1/d = 0.001)."""
    torch.manual_seed(0)
    layer = MPSMKGIDLayer(tiny_config(embed_size=1024), rebuild_adjacency=False)
    nodes = torch.nn.functional.normalize(torch.randn(2, 36, 1024), dim=-1)
    mask = torch.ones(2, 36, dtype=torch.bool)
    graph = semantic_knowledge_graph(nodes, torch.rand(2, 36, 36), mask, 9.0)
    knowledge = 1024 * torch.softmax(graph @ layer.propagation(nodes), -1) * nodes
    ratio = knowledge.norm(dim=-1) / nodes.norm(dim=-1)
    assert ((ratio > 0.5) & (ratio < 2.0)).all()


def test_gradient_reaches_the_spatial_kernels_and_the_edge_weights():
    """After one update (eq 8's branch leaves zero), the graph priors and eq 9 receive gradients of the order of their
    parameters' scale (the literal reading gave gradient/parameter ratios of ~1e-3 for the spatial kernels)."""
    model = eval_model(kgid_layers=3, embed_size=32)
    model.train()
    batch = make_batch(batch=4, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.criterion.max_violation = False  # the sum of violations
    model(**batch, return_loss=True).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.criterion.max_violation = False  # the sum of violations
    model(**batch, return_loss=True).loss.backward()
    kernels = model.spatial_kernels
    for name in ("mean_rho", "mean_theta", "log_sigma_rho", "mixture_logits"):
        assert getattr(kernels, name).grad.abs().max() > 0, name
    edge_weight = model.visual_kgid.layers[1].edge_out.weight
    textual_edges = model.textual_kgid.layers[2].edge_in.weight
    for weight in (edge_weight, textual_edges, model.visual_kgid.layers[0].propagation.weight):
        assert weight.grad.norm() / weight.norm() > 1e-3


def test_kgid_padded_nodes_change_nothing():
    layer = trained_kgid_layer(seed=3)
    nodes = torch.nn.functional.normalize(torch.randn(1, 3, 16), dim=-1)
    adjacency = torch.rand(1, 3, 3)
    out, _ = layer(nodes, adjacency, torch.ones(1, 3, dtype=torch.bool))
    padded_nodes = torch.cat([nodes, 5 * torch.randn(1, 2, 16)], 1)  # two padded nodes with arbitrary values
    padded_adjacency = torch.zeros(1, 5, 5)
    padded_adjacency[:, :3, :3] = adjacency
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    edge_out = layer.edge_out
    for rebuild, real in itertools.product((False, True), (None, real_node_index(mask))):
        # layer 0 (given E) and layers > 0 (eq 9 over valid nodes); the per-node maps on every node or on the real ones
        layer.edge_out = edge_out if rebuild else None
        reference, _ = layer(nodes, adjacency, torch.ones(1, 3, dtype=torch.bool))
        padded, _ = layer(padded_nodes, padded_adjacency, mask, real)
        torch.testing.assert_close(padded[:, :3], reference, atol=1e-6, rtol=0)
        assert padded[:, 3:].abs().sum() == 0


def test_linear_on_real_nodes_equals_the_layer_on_the_real_rows_with_the_same_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    nodes = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert real_node_index(torch.ones(2, 5, dtype=torch.bool)) is None  # nothing to skip: the plain layer
    assert real_node_index(mask).tolist() == [0, 1, 5, 6, 7, 8]
    packed = linear_on_real_nodes(layer, nodes, real_node_index(mask))
    expected = layer(nodes) * mask.unsqueeze(-1)
    torch.testing.assert_close(packed, expected)
    weights = torch.randn(2, 5, 3)
    packed_gradients = torch.autograd.grad((packed * weights).sum(), [nodes, layer.weight, layer.bias])
    expected_gradients = torch.autograd.grad((expected * weights).sum(), [nodes, layer.weight, layer.bias])
    for packed_gradient, expected_gradient in zip(packed_gradients, expected_gradients):
        torch.testing.assert_close(packed_gradient, expected_gradient)


# ----------------------------------------------------------------------------------------------------- eq 10-15
def test_distance_and_direction_representations():
    config = tiny_config(embed_size=3, sim_dim=3)
    x = torch.tensor([[1.0, 2.0, 2.0]])
    y = torch.tensor([[2.0, 0.0, 2.0]])
    distance = MPSMDistanceRepresentation(config)
    direction = MPSMDirectionRepresentation(config)
    for module in (distance, direction):
        with torch.no_grad():
            module.proj.weight.copy_(torch.eye(3))
            module.proj.bias.zero_()
    # distance: (x - y)^2 = (1, 4, 0) -> /sqrt(17)
    assert torch.allclose(distance(x, y), torch.tensor([[1.0, 4.0, 0.0]]) / math.sqrt(17), atol=1e-6)
    # direction: x/|x| * y/|y| = (1,2,2)/3 * (2,0,2)/sqrt(8) = (2, 0, 4)/(3 sqrt 8); sums to the cosine 6/(3 sqrt 8)
    terms = torch.tensor([[2.0, 0.0, 4.0]]) / (3 * math.sqrt(8))
    assert terms.sum().item() == pytest.approx(torch.cosine_similarity(x, y).item(), abs=1e-6)
    assert torch.allclose(direction(x, y), terms / terms.norm(), atol=1e-6)
    # the perspectives differ, and direction is invariant to the scale of its inputs
    assert not torch.allclose(distance(x, y), direction(x, y))
    assert torch.allclose(direction(3 * x, 0.5 * y), direction(x, y), atol=1e-6)


# ----------------------------------------------------------------------------------------------------- eq 16-20
def srgr_case(seed):
    """An SRGR step in eval mode and nodes [3 pairs, 5 nodes, 8] with 5, 3 and 1 valid nodes (one block of pairs)."""
    torch.manual_seed(seed)
    step = MPSMSRGRStep(tiny_config()).eval()
    nodes = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return step, nodes, mask


def srgr_round(step, blocks, masks, first_only=False):
    """One SRGR round over blocks of pairs: the edges of every block (eq 16), then each block's eq 17-20."""
    return [step(nodes, *edges, first_only) for nodes, edges in zip(blocks, step.edges(blocks, masks))]


def test_srgr_edge_rows_sum_to_one_over_valid_nodes():
    step, nodes, mask = srgr_case(0)
    [(forward_edges, backward_edges)] = step.edges([nodes], [mask])
    for edges in (forward_edges, backward_edges):
        assert torch.allclose(edges.sum(-1), torch.ones(3, 5), atol=1e-6)
        assert edges[1, :, 3:].abs().sum() == 0 and edges[2, :, 1:].abs().sum() == 0
    # E← is E→ with the roles of w_out and w_in swapped: sigma(i_a + o_b)
    o = step.out_norm([step.out_score(nodes).squeeze(-1)], [mask])[0][0]
    i = step.in_norm([step.in_score(nodes).squeeze(-1)], [mask])[0][0]
    expected = torch.sigmoid(i[:, None] + o[None, :])
    assert torch.allclose(backward_edges[0], expected / expected.sum(-1, keepdim=True), atol=1e-6)
    [out] = srgr_round(step, [nodes], [mask])
    assert out.shape == nodes.shape and torch.isfinite(out).all()


def test_srgr_step_matches_eq_17_to_20_written_out_with_and_without_autograd():
    step, nodes, mask = srgr_case(1)
    [(forward_edges, backward_edges)] = step.edges([nodes], [mask])
    forward_nodes = (forward_edges @ nodes) @ step.out_message.weight.T  # eq 17
    backward_nodes = (backward_edges @ nodes) @ step.in_message.weight.T
    gate = torch.sigmoid(torch.cat([forward_nodes, backward_nodes], -1) @ step.gate.weight.T + step.gate.bias)  # eq 18
    forward_nodes = (gate * forward_nodes) @ step.out_refine.weight.T + forward_nodes  # eq 19
    backward_nodes = (gate * backward_nodes) @ step.in_refine.weight.T + backward_nodes
    expected = (forward_nodes + backward_nodes) @ step.merge.weight.T + step.merge.bias  # eq 20
    expected = expected / expected.norm(dim=-1, keepdim=True)  # bounded nodes
    with torch.no_grad():  # matmuls accumulate in place
        torch.testing.assert_close(srgr_round(step, [nodes], [mask])[0], expected.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(srgr_round(step, [nodes], [mask], first_only=True)[0], expected[:, :1].detach(),
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(srgr_round(step, [nodes], [mask])[0], expected, atol=1e-6, rtol=0)  # autograd: out of place
    gradient = torch.autograd.grad(srgr_round(step, [nodes], [mask])[0].sum(), step.gate.weight)[0]
    torch.testing.assert_close(gradient, torch.autograd.grad(expected.sum(), step.gate.weight)[0])


def test_srgr_nodes_stay_bounded_and_scores_start_near_one_value():
    """Over three rounds every reconstructed node keeps unit norm; at initialisation the logits of random pairs lie
    within a narrow band around the read-out bias, where σ' is at its largest."""
    model = eval_model(srgr_steps=3, embed_size=32, sim_dim=16)
    head = model.heads["t2i_distance"]
    nodes = torch.nn.functional.normalize(torch.randn(64, 7, 16), dim=-1)
    mask = torch.ones(64, 7, dtype=torch.bool)
    for step in head.srgr:
        [nodes] = srgr_round(step, [nodes], [mask])
        torch.testing.assert_close(nodes.norm(dim=-1), torch.ones(64, 7))
    batch = make_batch(batch=6, seed=4)
    with torch.no_grad():
        logits = model.pair_logits(model.encode_image(batch["region_features"], batch["boxes"]),
                                   model.encode_text(batch["input_ids"], batch["attention_mask"]))["distance"]
    bound = head.evaluate.weight.norm().item()  # |w·s| <= ‖w‖ (≈ √2 with Xavier, whatever m) for a unit node
    assert (logits - head.evaluate.bias).abs().max() <= bound + 1e-5
    assert logits.std() < 0.25 * bound  # random pairs: near one value, far from σ's flat tails


def test_hinge_on_logits_keeps_the_ranking_of_the_scores():
    model = eval_model(similarity="joint")
    batch = make_batch(batch=5, seed=6)
    with torch.no_grad():
        image = model.encode_image(batch["region_features"], batch["boxes"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        logits = model.pair_logits(image, text)
        scores = model.similarity(image, text)
    for value in logits.values():  # σ is monotone: each perspective ranks alike by logit and by score
        assert torch.equal(value.argsort(1), torch.sigmoid(value).argsort(1))
    torch.testing.assert_close(scores, (torch.sigmoid(logits["distance"]) + torch.sigmoid(logits["direction"])) / 2)
    model.train()
    logits = model.pair_logits(image, text)
    model.criterion.max_violation = False  # the sum of violations
    on_logits = model.criterion(logits, image, text)
    expected = sum(triplet_loss(value, 0.2, False) for value in logits.values())
    torch.testing.assert_close(on_logits, expected)
    model.config.hinge_on_logits = False
    model.criterion.max_violation = False  # the sum of violations
    on_scores = model.criterion(logits, image, text)
    torch.testing.assert_close(on_scores, sum(triplet_loss(torch.sigmoid(v), 0.2, False) for v in logits.values()))


def test_add_linear_accumulates_in_place_only_without_autograd():
    target, inputs, weight = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4, 5, requires_grad=True)
    expected = target + inputs @ weight.T
    with torch.no_grad():
        result = add_linear(target.clone(), inputs, weight)
        same = target.clone()
        assert add_linear(same, inputs, weight).data_ptr() == same.data_ptr()
    torch.testing.assert_close(result, expected.detach())
    kept = target.clone()
    result = add_linear(kept, inputs, weight)
    assert result.requires_grad and torch.equal(kept, target)  # autograd needs `target` unchanged
    torch.testing.assert_close(result, expected)


def test_attended_keys_are_unit_norm_sums_of_the_attention():
    """The norms of the attended sums come from the keys' Gram matrix; the result is l2norm(Σ_b a_b k_b)."""
    torch.manual_seed(2)
    words, regions = torch.randn(4, 5, 16), torch.randn(3, 6, 16)
    word_mask = torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]
    region_mask = torch.arange(6) < torch.tensor([6, 2, 4])[:, None]
    attended, attention = cross_attention(words, word_mask, regions, region_mask, 9.0, False)
    direct = torch.einsum("itab,ibd->itad", attention, regions)
    torch.testing.assert_close(attended, direct / direct.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    assert attention.shape == (3, 4, 5, 6) and attention[1, :, :, 2:].abs().sum() == 0


# ----------------------------------------------------------------------------------------------------- eq 21
def test_triplet_loss_hand_computed():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.95]])
    assert triplet_loss(scores, margin=0.2).item() == 0.0  # positives beat every negative by the margin
    scores = torch.tensor([[0.5, 0.6], [0.2, 0.4]])
    # image 0: 0.2 + 0.6 - 0.5 = 0.3; image 1: 0.2 + 0.2 - 0.4 = 0 ; caption 0: 0.2 + 0.2 - 0.5 = 0; caption 1: 0.2 + 0.6 - 0.4 = 0.4
    assert triplet_loss(scores, margin=0.2).item() == pytest.approx(0.7, abs=1e-6)
    scores = torch.tensor([[0.5, 0.6, 0.55], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    hardest = triplet_loss(scores, margin=0.2, max_violation=True).item()
    summed = triplet_loss(scores, margin=0.2, max_violation=False).item()
    # image 0 negatives: 0.3 and 0.25 -> hardest 0.3, sum 0.55; captions: column 1 -> 0.3, column 2 -> 0.25
    assert hardest == pytest.approx(0.3 + 0.3 + 0.25, abs=1e-6)
    assert summed == pytest.approx(0.55 + 0.3 + 0.25, abs=1e-6)
    same_image = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert triplet_loss(scores, 0.2, True, same_image).item() == pytest.approx(0.25 + 0.25, abs=1e-6)


# ----------------------------------------------------------------------------------------------------- the model
def test_forward_shapes_and_clip_convention():
    model = eval_model()
    batch = make_batch()
    output = model(**batch, return_loss=True)
    assert output.logits_per_image.shape == (3, 3)
    assert torch.equal(output.logits_per_text, output.logits_per_image.T)
    assert output.image_embeds.shape == (3, 16) and output.text_embeds.shape == (3, 16)
    assert ((output.logits_per_image > 0) & (output.logits_per_image < 1)).all()
    assert output.loss.dim() == 0 and output.loss >= 0
    assert model(**batch).loss is None


def test_similarity_equals_forward_and_pairwise_scores():
    model = eval_model(similarity="joint")
    batch = make_batch(batch=4)
    with torch.no_grad():
        image = model.encode_image(batch["region_features"], batch["boxes"], batch["region_mask"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["dependency_adjacency"])
        block = model.similarity(image, text)
        assert torch.allclose(block, model(**batch).logits_per_image, atol=1e-6)
        for i in range(4):
            for j in range(4):
                one_image = type(image)(**{k: v[i : i + 1] for k, v in image.items()})
                one_text = type(text)(**{k: v[j : j + 1] for k, v in text.items()})
                assert model.similarity(one_image, one_text).item() == pytest.approx(block[i, j].item(), abs=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"similarity": "direction"},
        {"similarity": "joint"},
        {"streams": "both", "similarity": "joint"},
        {"streams": "i2t"},
        {"word_self_attention": True, "text_guided_image_features": True},
        {"alignment": "local"},
        {"alignment": "global"},
        {"use_srgr": False},
        {"kgid_layers": 0},
    ],
)
def test_padding_never_changes_scores(overrides):
    """Extra padded regions and words (eval mode) give the same scores as the unpadded inputs."""
    model = eval_model(**overrides)
    batch = make_batch(batch=3, regions=4, words=5)
    padded = dict(batch)
    padded["region_features"] = torch.cat([batch["region_features"], 100 * torch.randn(3, 2, 12)], 1)
    padded["boxes"] = torch.cat([batch["boxes"], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(3, 2, 4)], 1)
    padded["region_mask"] = torch.cat([batch["region_mask"], torch.zeros(3, 2, dtype=torch.long)], 1)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((3, 3), 7)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(3, 3, dtype=torch.long)], 1)
    padded["dependency_adjacency"] = torch.nn.functional.pad(batch["dependency_adjacency"], (0, 3, 0, 3), value=1.0)
    with torch.no_grad():
        expected = model(**batch).logits_per_image
        assert torch.allclose(model(**padded).logits_per_image, expected, atol=1e-5)
        assert torch.isfinite(expected).all()


VARIANTS = [
    {"kgid_layers": 0},
    {"visual_kgid": False},
    {"textual_kgid": False},
    {"use_srgr": False},
    {"alignment": "global"},
    {"alignment": "local"},
    {"similarity": "direction"},
    {"srgr_steps": 1},
    {"loss_type": "fine_grained_labels"},
    {"loss_type": "both"},
    {"streams": "both"},
    {"global_loss_weight": 0.5},
    {"word_self_attention": True},
    {"text_guided_image_features": True},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_every_variant_trains_with_finite_gradients(overrides):
    torch.manual_seed(0)
    model = MPSMModel(tiny_config(**overrides)).train()
    model.criterion.max_violation = False  # the sum of violations
    loss = model(**make_batch(batch=4, seed=3), return_loss=True).loss
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert loss.item() > 0 and gradients and all(torch.isfinite(g).all() for g in gradients)
    assert sum(g.abs().sum().item() for g in gradients) > 0


@pytest.mark.parametrize(
    "overrides",
    [{}, {"similarity": "joint"}, {"loss_type": "both", "streams": "both", "word_self_attention": True}],
)
def test_training_steps_make_the_loss_fall(overrides):
    torch.manual_seed(0)
    model = MPSMModel(tiny_config(dropout=0.0, **overrides)).train()
    batch = make_batch(batch=6, regions=5, words=6, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        model.criterion.max_violation = False  # the sum of violations
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_kgid_ablation_removes_parameters():
    full = MPSMModel(tiny_config())
    without = MPSMModel(tiny_config(kgid_layers=0))
    assert without.visual_kgid is None and without.textual_kgid is None and without.spatial_kernels is None
    assert sum(p.numel() for p in without.parameters()) < sum(p.numel() for p in full.parameters())
    assert len(full.visual_kgid.layers) == 3 and full.visual_kgid.layers[0].edge_out is None


def test_missing_boxes_warn_once_and_fall_back():
    model = eval_model()
    batch = make_batch()
    batch.pop("boxes")
    with pytest.warns(UserWarning, match="boxes"):
        output = model(**batch)
    assert torch.isfinite(output.logits_per_image).all()


def test_scores_never_nan_on_extreme_inputs():
    model = eval_model()
    batch = make_batch()
    for features in (torch.zeros(3, 5, 12), 1e6 * torch.ones(3, 5, 12), 1e-30 * torch.randn(3, 5, 12)):
        batch["region_features"] = features
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits_per_image).all()


def test_pixel_boxes_with_image_sizes_equal_normalised_boxes():
    model = eval_model()
    batch = make_batch()
    sizes = torch.tensor([[640, 480], [500, 375], [800, 600]])
    pixel = dict(batch, boxes=batch["boxes"] * sizes.repeat(1, 2).unsqueeze(1).float(), image_sizes=sizes)
    with torch.no_grad():
        assert torch.allclose(model(**pixel).logits_per_image, model(**batch).logits_per_image, atol=1e-5)


@pytest.mark.parametrize(
    "change, argument",
    [
        (lambda b: b.update(region_features=torch.randn(3, 5, 11)), "region_features"),
        (lambda b: b.update(region_features=torch.randn(3, 12)), "region_features"),
        (lambda b: b.update(boxes=b["boxes"][:2]), "boxes"),
        (lambda b: b.update(boxes=b["boxes"][..., :3]), "boxes"),
        (lambda b: b["region_features"].__setitem__((0, 0, 0), float("nan")), "region_features"),
        (lambda b: b["region_features"].__setitem__((1, 2, 3), float("inf")), "region_features"),
        (lambda b: b["boxes"].__setitem__((0, 0, 2), 1.5), "boxes"),
        (lambda b: b["boxes"].__setitem__((0, 0, 0), 0.9), "boxes"),  # x2 < x1
        (lambda b: b["attention_mask"].__setitem__(1, 0), "attention_mask"),
        (lambda b: b["region_mask"].__setitem__(2, 0), "region_mask"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), "input_ids"),
        (lambda b: b.update(input_ids=b["input_ids"] + 1000), "input_ids"),
        (lambda b: b.update(dependency_adjacency=b["dependency_adjacency"][:, :2]), "dependency_adjacency"),
        (lambda b: b.update(region_mask=b["region_mask"][:, :2]), "region_mask"),
        (lambda b: b.update(image_sizes=torch.tensor([[10, 10]])), "image_sizes"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, argument):
    model = eval_model()
    batch = make_batch()
    change(batch)
    with pytest.raises(ValueError, match=argument):
        model(**batch)


def test_loss_needs_a_square_batch():
    model = eval_model()
    batch = make_batch()
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:2], batch["attention_mask"][:2]
    batch["dependency_adjacency"] = batch["dependency_adjacency"][:2]
    assert model(**batch).logits_per_image.shape == (3, 2)
    with pytest.raises(ValueError, match="as many captions as images"):
        model(**batch, return_loss=True)


# ----------------------------------------------------------------------------------------------------- MPSM*
def test_ensemble_is_the_mean_of_its_members_and_saves_as_one_checkpoint(tmp_path):
    torch.manual_seed(0)
    dis_model = MPSMModel(tiny_config(similarity="distance")).eval()
    dir_model = MPSMModel(tiny_config(similarity="direction")).eval()
    ensemble = MPSMEnsembleModel.from_members(dis_model, dir_model).eval()
    batch = make_batch()
    with torch.no_grad():
        expected = (dis_model(**batch).logits_per_image + dir_model(**batch).logits_per_image) / 2
        assert torch.allclose(ensemble(**batch).logits_per_image, expected, atol=1e-6)
        image = ensemble.encode_image(batch["region_features"], batch["boxes"], batch["region_mask"])
        text = ensemble.encode_text(batch["input_ids"], batch["attention_mask"], batch["dependency_adjacency"])
        assert torch.allclose(ensemble.similarity(image, text), expected, atol=1e-6)
    ensemble.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    loaded = MPSMEnsembleModel.from_pretrained(tmp_path).eval()
    assert loaded.config.dis_config.similarity == "distance" and loaded.config.dir_config.similarity == "direction"
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits_per_image, expected, atol=1e-6)
    assert ensemble(**batch, return_loss=True).loss > 0


def test_ensemble_config_checks_members():
    with pytest.raises(ValueError, match="vocab_size"):
        MPSMEnsembleConfig(dis_config={**TINY}, dir_config={**TINY, "vocab_size": 99})
    with pytest.raises(ValueError, match=r"img_dim \{'dis.img_dim': 12, 'dir.img_dim': 8\} must match.*region_features"):
        MPSMEnsembleConfig(dis_config={**TINY}, dir_config={**TINY, "img_dim": 8})
    with pytest.raises(ValueError, match="dis_model"):
        MPSMEnsembleModel.from_members("not a model", MPSMModel(tiny_config()))


def test_ensemble_from_members_by_name_equals_the_positional_call():
    torch.manual_seed(0)
    dis_model = MPSMModel(tiny_config(similarity="distance")).eval()
    dir_model = MPSMModel(tiny_config(similarity="direction")).eval()
    by_name = MPSMEnsembleModel.from_members(dir=dir_model, dis=dis_model).eval()  # any keyword order
    positional = MPSMEnsembleModel.from_members(dis_model, dir_model).eval()
    assert by_name.config.dis_config.similarity == "distance" and by_name.config.dir_config.similarity == "direction"
    assert by_name.state_dict().keys() == positional.state_dict().keys()
    assert all(torch.equal(value, positional.state_dict()[name]) for name, value in by_name.state_dict().items())
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(by_name(**batch).logits_per_image, positional(**batch).logits_per_image)


def test_ensemble_from_members_refuses_a_model_of_another_perspective():
    dis_model = MPSMModel(tiny_config(similarity="distance"))
    dir_model = MPSMModel(tiny_config(similarity="direction"))
    with pytest.raises(ValueError, match="`dir` is the dir member and must have similarity='direction', got "
                                         "similarity='distance'"):
        MPSMEnsembleModel.from_members(dis=dis_model, dir=dis_model)
    with pytest.raises(ValueError, match="`dis_model` is the dis member and must have similarity='distance', got "
                                         "similarity='direction'"):
        MPSMEnsembleModel.from_members(dir_model, dis_model)  # swapped positional models
    with pytest.raises(ValueError, match="`dir` is the dir member .* got similarity='joint'"):
        MPSMEnsembleModel.from_members(dis=dis_model, dir=MPSMModel(tiny_config(similarity="joint")))
    with pytest.raises(ValueError, match=r"unknown: \['dis_model'\], missing: \['dis'\]"):
        MPSMEnsembleModel.from_members(dis_model=dis_model, dir=dir_model)
    with pytest.raises(ValueError, match="not both"):
        MPSMEnsembleModel.from_members(dis_model, dir=dir_model)


def test_save_and_load_keeps_weights_and_scores(tmp_path):
    model = eval_model(similarity="joint", streams="both")
    model.save_pretrained(tmp_path)
    config = __import__("json").loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("MPSMModel")
    assert (tmp_path / "modeling_mpsm.py").exists() and (tmp_path / "configuration_mpsm.py").exists()
    loaded = MPSMModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits_per_image, loaded(**batch).logits_per_image)


# ----------------------------------------------------------------------------------------------------- transformers conventions
def test_return_dict_false_gives_a_tuple_and_unknown_arguments_are_refused_by_name():
    model = eval_model()
    batch = make_batch(batch=3, seed=7)
    with torch.no_grad():
        output = model(**batch, return_loss=True)
        as_tuple = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 5
    torch.testing.assert_close(as_tuple[0], output.loss)
    torch.testing.assert_close(as_tuple[1], output.logits_per_image)
    for typo in ("labels", "input_idss"):
        with pytest.raises(TypeError, match=typo):
            model(**batch, **{typo: batch["input_ids"]})
    ensemble = MPSMEnsembleModel(MPSMEnsembleConfig(dis_config=TINY, dir_config=TINY)).eval()
    with torch.no_grad():
        assert isinstance(ensemble(**batch, return_dict=False), tuple)
    with pytest.raises(TypeError, match="labels"):
        ensemble(**batch, labels=batch["input_ids"])


def test_input_embeddings_resize_and_clip_style_feature_aliases():
    model = eval_model()
    assert model.get_input_embeddings() is model.text_encoder.embed
    model.resize_token_embeddings(48)
    assert model.get_input_embeddings().weight.shape == (48, TINY["word_dim"]) and model.config.vocab_size == 48
    batch = make_batch(batch=2, seed=8)
    batch["input_ids"][0, 0] = 45  # a new word id is now valid
    with torch.no_grad():
        image = model.encode_image(batch["region_features"], batch["boxes"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(model.get_image_features(batch["region_features"], batch["boxes"]).pooler_output,
                                   image.image_embeds)
        torch.testing.assert_close(model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output,
                                   text.text_embeds)


@pytest.mark.parametrize("streams", ["t2i", "both"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(streams):
    """Same loss, gradients and batch-norm running statistics with the per-pair part recomputed in the backward pass
    (SRGR's batch norms sit outside the recomputed segments, so they see each batch once)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MPSMModel(tiny_config(similarity="joint", streams=streams, dropout=0.0))
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5.x's name (gradient_checkpointing_enable is deprecated)
            assert model.is_activation_checkpointing
        model.criterion.max_violation = False  # the sum of violations
        loss = model(**make_batch(batch=4, seed=9), return_loss=True).loss
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        statistics = {name: b.clone() for name, b in model.named_buffers() if "running" in name or "num_batches" in name}
        results.append((loss, gradients, statistics))
    (reference, expected, expected_statistics), (loss, gradients, statistics) = results
    torch.testing.assert_close(loss, reference)
    assert gradients.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(gradients[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in expected_statistics:
        torch.testing.assert_close(statistics[name], expected_statistics[name], msg=name)


def test_caption_blocks_follow_length_and_merge_where_cutting_saves_no_padding(monkeypatch):
    import modeling_mpsm.modeling_mpsm as modeling

    monkeypatch.setattr(modeling, "CAPTION_BLOCKS", 4)
    lengths = torch.tensor([2, 9, 4, 7, 3, 9, 5, 6])
    blocks = modeling.caption_blocks(lengths.argsort(stable=True), lengths, 0)
    assert [lengths[block].tolist() for block in blocks] == [[2, 3], [4, 5], [6, 7], [9, 9]]
    uniform = torch.full((10,), 12)  # e.g. a scoring block of captions of one length: one block
    assert [block.tolist() for block in modeling.caption_blocks(uniform.argsort(stable=True), uniform, 0)] == [list(range(10))]
    lengths = torch.tensor([3, 3, 3, 8])  # cuts after the first, second and third captions save nothing
    assert [lengths[block].tolist() for block in modeling.caption_blocks(lengths.argsort(stable=True), lengths, 0)] == [
        [3, 3, 3], [8]]


@pytest.mark.parametrize("options", [{}, {"streams": "both", "similarity": "joint"},
                                     {"word_self_attention": True, "text_guided_image_features": True}])
def test_caption_blocks_of_similar_length_give_the_loss_and_gradients_of_one_block(options, monkeypatch):
    """The per-pair part runs the captions in blocks of similar length (each cut to its longest caption); SRGR's batch
    norms share the statistics of the whole batch, so training sees the same loss, gradients and running statistics."""
    import modeling_mpsm.modeling_mpsm as modeling

    batch = make_batch(batch=9, words=9, seed=12)
    lengths = torch.tensor([2, 9, 4, 7, 3, 9, 5, 6, 2])  # unsorted, repeated, down to the bare minimum
    batch["attention_mask"] = (torch.arange(9)[None] < lengths[:, None]).long()
    batch["input_ids"] = batch["input_ids"].clamp_min(4) * batch["attention_mask"]
    batch["dependency_adjacency"] = chain_adjacency(batch["attention_mask"])
    results, block_counts = [], []
    original_caption_blocks = modeling.caption_blocks

    def counted_caption_blocks(*args, **kwargs):
        blocks = original_caption_blocks(*args, **kwargs)
        block_counts.append(len(blocks))
        return blocks

    monkeypatch.setattr(modeling, "caption_blocks", counted_caption_blocks)
    # one block; four; and as many as BLOCK_FLOATS asks for when a batch's per-pair tensors are large (here: every
    # length its own block, as with BLOCK_FLOATS = 1)
    for blocks, block_floats in ((1, 2**40), (4, 2**40), (1, 1)):
        monkeypatch.setattr(modeling, "CAPTION_BLOCKS", blocks)
        monkeypatch.setattr(modeling, "BLOCK_FLOATS", block_floats)
        torch.manual_seed(0)
        model = MPSMModel(tiny_config(dropout=0.0, **options))
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        statistics = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
        with torch.no_grad():
            scores = model.eval()(**batch).logits_per_image
        results.append((loss, gradients, statistics, scores))
    assert sorted(set(block_counts)) == [1, 4, 7]  # 7 lengths: 2, 3, 4, 5, 6, 7, 9
    (loss, gradients, statistics, scores) = results[0]
    for block_loss, block_gradients, block_statistics, block_scores in results[1:]:
        torch.testing.assert_close(block_loss, loss)
        assert block_gradients.keys() == gradients.keys()
        for name in gradients:  # float32 sums in another order: equal to rounding, relative to the gradient's size
            error = (block_gradients[name] - gradients[name]).norm()
            assert error <= 1e-5 * gradients[name].norm() + 1e-5, (name, error)  # + 1e-5: gradients near 0 exactly
        for name in statistics:
            torch.testing.assert_close(block_statistics[name], statistics[name], msg=name)
        torch.testing.assert_close(block_scores, scores, atol=1e-6, rtol=1e-5)


def test_every_public_path_runs_under_bf16_autocast():
    model = eval_model(similarity="joint")
    batch = make_batch(batch=3, seed=10)
    with torch.no_grad():
        reference = model(**batch).logits_per_image
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image = model.encode_image(batch["region_features"], batch["boxes"])
            text = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["dependency_adjacency"])
            scores = model.similarity(image, text)
            output = model(**batch)
    for value in (scores, output.logits_per_image):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value.float(), reference, atol=0.02, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, return_loss=True).loss
    loss.backward()
    assert torch.isfinite(loss) and model.image_encoder.fc.weight.grad is not None
