"""What transformers' common model tests (ModelTesterMixin) check, written for MPSM on the tiny models of tests/tiny.py,
on CPU: save/load, dtype round trips (float16 with padding included), resize embeddings, gradient checkpointing on and
off, outputs as dict and tuple (with hidden states), torch.export / torch.compile, batching equivalence.

Every batch here is padded: captions of different lengths and images with masked regions, where float16 used to give
NaN (`l2norm`'s 1e-8 is 0 in float16, so padded rows were 0 / 0).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import pipeline
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

import modeling_mpsm.modeling_mpsm as modeling
from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel
from modeling_mpsm.configuration_mpsm import PERSPECTIVES
from modeling_mpsm.modeling_mpsm import MPSMPairNodes, MPSMSRGRStep, chain_adjacency
from modeling_mpsm.retrieval import MPSMRetriever
from tiny import TINY, WORDS, tiny_models, tiny_processor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' tensors are too small to share out: one thread spends half the CPU time of two here (no
    waiting on the other thread), and far less when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def padded_batch(num_images=3, num_texts=3, regions=(5, 3, 4), lengths=(6, 4, 2), seed=0):
    """Images of 5 region slots with `regions` real ones, captions of `lengths` words right-padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    slots, width = max(regions), max(lengths)
    corners = torch.rand(num_images, slots, 2, generator=generator) * 0.5
    region_mask = torch.arange(slots)[None] < torch.tensor(regions)[:num_images, None]
    attention_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:num_texts, None]).long()
    return dict(
        region_features=torch.randn(num_images, slots, TINY["img_dim"], generator=generator),
        boxes=torch.cat([corners, corners + 0.4], -1),
        region_mask=region_mask.long(),
        input_ids=torch.randint(4, TINY["vocab_size"], (num_texts, width), generator=generator) * attention_mask,
        attention_mask=attention_mask,
        dependency_adjacency=chain_adjacency(attention_mask),
    )


def image_inputs(batch):
    return {name: batch[name] for name in ("region_features", "boxes", "region_mask")}


def text_inputs(batch):
    return {name: batch[name] for name in ("input_ids", "attention_mask", "dependency_adjacency")}


def tiny_model(**overrides):
    torch.manual_seed(0)
    return MPSMModel(MPSMConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny dis model after 10 Adam updates on 4 padded pairs (its loss falls), in eval mode, and its folder."""
    model = tiny_model(dropout=0.0)
    batch = padded_batch(4, 4, regions=(5, 3, 4, 2), lengths=(6, 4, 2, 5), seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    folder = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(folder)
    return model, str(folder)


# --------------------------------------------------------------------------------------------------- configurations
def test_configurations_round_trip_and_store_their_perspectives(tmp_path):
    """As transformers' ConfigTester: dict, JSON file and save/load round trips; the joint and ensemble configurations
    store their perspectives (old checkpoints: test_old_checkpoints.py), and bad ones are refused by name."""
    joint = MPSMConfig(**TINY, similarity="joint")
    assert joint.joint_perspectives == list(PERSPECTIVES) and MPSMConfig(**TINY).joint_perspectives is None
    ensemble = tiny_models()[1].config
    assert ensemble.members == list(PERSPECTIVES.values()) and list(ensemble.member_configs) == ensemble.members
    for index, config in enumerate((joint, MPSMConfig(**TINY, joint_perspectives=None), ensemble)):
        config.save_pretrained(tmp_path / str(index))  # adds the `auto_map` of the package's classes
        expected = config.to_dict()
        config.to_json_file(tmp_path / f"{index}.json")
        for loaded in (type(config).from_pretrained(tmp_path / str(index)), type(config).from_dict(expected),
                       type(config).from_json_file(tmp_path / f"{index}.json")):
            assert loaded.to_dict() == expected
    only_dis = MPSMEnsembleConfig(dis_config=TINY)  # the members are those given
    assert only_dis.members == ["dis"] and only_dis.dir_config is None
    for make, message in (
        (lambda: MPSMConfig(similarity="joint", joint_perspectives=["distance"]), "`joint_perspectives` must list"),
        (lambda: MPSMConfig(similarity="joint", joint_perspectives=["distance", "cosine"]), "`joint_perspectives`"),
        (lambda: MPSMConfig(joint_perspectives=["distance", "direction"]), "applies to similarity='joint'"),
        (lambda: MPSMEnsembleConfig(members=["dis", "cos"]), "`members` must list distinct short names"),
        (lambda: MPSMEnsembleConfig(members=["dis"], dir_config=TINY), "`dir_config` is given but 'dir' is not"),
    ):
        with pytest.raises(ValueError, match=message):
            make()


# --------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_keeps_weights_config_and_outputs(trained, tmp_path):
    model, folder = trained
    loaded = MPSMModel.from_pretrained(folder).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in loaded.state_dict().items())
    bookkeeping = {"architectures", "auto_map", "custom_pipelines", "transformers_version", "_name_or_path", "dtype"}
    settings = [{key: value for key, value in config.to_dict().items() if key not in bookkeeping}
                for config in (loaded.config, model.config)]
    assert settings[0] == settings[1]
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits_per_image, model(**batch).logits_per_image)
    _, ensemble = tiny_models()
    ensemble.save_pretrained(tmp_path)
    reloaded = MPSMEnsembleModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.members == ["dis", "dir"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits_per_image, ensemble(**batch).logits_per_image)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_round_trips_keep_the_read_out_in_float32(trained, dtype, tmp_path):
    """Loaded in a reduced dtype every weight is in it but the score read-out (`_keep_in_fp32_modules_strict`); saved
    again it loads back in that dtype ("auto") with the same weights, and in float32 as the original rounded."""
    model, folder = trained
    reduced = MPSMModel.from_pretrained(folder, dtype=dtype).eval()
    kept = {name for name, parameter in reduced.named_parameters() if parameter.dtype != dtype}
    assert kept == {"heads.t2i_distance.evaluate.weight", "heads.t2i_distance.evaluate.bias"}
    assert all(reduced.get_parameter(name).dtype == torch.float32 for name in kept)
    reduced.save_pretrained(tmp_path)
    again = MPSMModel.from_pretrained(tmp_path)
    assert {name: value.dtype for name, value in again.state_dict().items()} == {
        name: value.dtype for name, value in reduced.state_dict().items()}
    assert all(torch.equal(value, reduced.state_dict()[name]) for name, value in again.state_dict().items())
    widened = MPSMModel.from_pretrained(tmp_path, dtype=torch.float32)
    for name, value in widened.state_dict().items():
        original = model.state_dict()[name]
        assert value.dtype == original.dtype, name
        expected = original if name in kept or not original.is_floating_point() else original.to(dtype).float()
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------- float16
@pytest.fixture(scope="module")
def float16_models(trained):
    """The trained model in float16 twice: loaded with dtype=torch.float16 (read-out kept in float32) and `.half()`;
    and the ensemble `.half()` (its dir member: the direction perspective)."""
    model, folder = trained
    return {"from_pretrained": MPSMModel.from_pretrained(folder, dtype=torch.float16).eval(),
            "half": MPSMModel.from_pretrained(folder).eval().half(), "ensemble": tiny_models()[1].half()}


@pytest.mark.parametrize("way", ["from_pretrained", "half", "ensemble"])
def test_float16_with_padding_is_finite_on_every_public_path(float16_models, way, monkeypatch):
    monkeypatch.setattr(modeling, "CAPTION_BLOCKS", 1)  # the captions of different lengths in one block: padded words
    model = float16_models[way]
    batch = padded_batch()
    with torch.no_grad():
        image = model.encode_image(**image_inputs(batch))
        text = model.encode_text(**text_inputs(batch))
        values = [model.similarity(image, text), *model(**batch, return_loss=True).values()]
        values += [*model.get_image_features(**image_inputs(batch)).values()]
        values += [*model.get_text_features(**text_inputs(batch)).values()]
    for image, text in zip(image.members().values(), text.members().values()):  # an ensemble's members
        assert image.region_embeds.dtype == text.word_embeds.dtype == torch.float16
        assert (image.region_embeds[1, 3:] == 0).all() and (text.word_embeds[2, 2:] == 0).all()  # padding stays 0
        values += [image.region_embeds, image.image_embeds, text.word_embeds, text.text_embeds, text.word_weights]
    for value in values:
        assert torch.isfinite(value).all()


def test_float16_training_loss_and_gradients_are_finite():
    """Every perspective and stream (a float16 y of zeros, a padded word, gave the direction perspective inf gradients)."""
    model = tiny_model(similarity="joint", streams="both", dropout=0.0).half().train()
    loss = model(**padded_batch(), return_loss=True).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_float16_retriever_and_pipeline_rank_with_finite_scores(float16_models):
    model, processor = float16_models["from_pretrained"], tiny_processor()  # the processor pads to 4 regions
    batch = padded_batch()
    counts = [min(count, 4) for count in batch["region_mask"].sum(1).tolist()]
    features = [batch["region_features"][i, :count] for i, count in enumerate(counts)]
    boxes = [batch["boxes"][i, :count] for i, count in enumerate(counts)]
    captions = ["a man runs on the grass", "the red dog", "a ball"]
    retriever = MPSMRetriever(model, processor, rerank_k=3)
    retriever.add_images(features, boxes=boxes)
    retriever.add_texts(captions)
    results = retriever.search_text("a red ball on the grass", k=3) + retriever.search_image(features[1], boxes[1], k=3)
    retrieval = pipeline("mpsm-retrieval", model=model, processor=processor)
    retrieval.set_gallery(images={"region_features": features, "boxes": boxes}, captions=captions)
    results += retrieval("a dog on the grass", top_k=3) + retrieval({"region_features": features[0], "boxes": boxes[0]},
                                                                   top_k=3)
    assert len(results) == 12 and all(0 < result["score"] < 1 for result in results)


def test_float16_scores_agree_with_float32_on_a_trained_model(trained, float16_models):
    """Within float16's precision: scores in (0, 1) are ~1e-3 apart at most (the read-out in float32 or not)."""
    model, _ = trained
    batch = padded_batch(3, 3, seed=5)
    with torch.no_grad():
        reference = model(**batch).logits_per_image
        assert reference.max() - reference.min() > 0.05  # a trained model's scores are spread
        for half in (float16_models["from_pretrained"], float16_models["half"]):
            torch.testing.assert_close(half(**batch).logits_per_image.float(), reference, rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------------- resize embeddings
def test_resize_token_embeddings_keeps_the_old_words_and_round_trips(trained, tmp_path):
    model, folder = trained
    model = MPSMModel.from_pretrained(folder).eval()
    batch = padded_batch()
    with torch.no_grad():
        reference = model(**batch).logits_per_image
    old_rows = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(WORDS) + 7)
    assert model.config.vocab_size == len(WORDS) + 7 and model.get_input_embeddings().weight.shape[0] == len(WORDS) + 7
    torch.testing.assert_close(model.get_input_embeddings().weight[: len(WORDS)], old_rows, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits_per_image, reference)
        batch["input_ids"][0, 0] = len(WORDS) + 6  # a new word is now valid
        scores = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = MPSMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == len(WORDS) + 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits_per_image, scores)
    loaded.resize_token_embeddings(len(WORDS))  # and back
    assert loaded.config.vocab_size == len(WORDS)
    batch["input_ids"][0, 0] = 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits_per_image, model(**batch).logits_per_image)


# --------------------------------------------------------------------------------------------------- checkpointing
def test_gradient_checkpointing_layers_are_switched_on_and_off():
    """As transformers' `test_gradient_checkpointing_enable_disable`: the checkpointed blocks are
    `GradientCheckpointingLayer`s, and every module with a `gradient_checkpointing` flag follows enable / disable
    (the deprecated `gradient_checkpointing_enable` name too), for the model and for the ensemble's members."""
    dis, ensemble = tiny_models()
    for model in (dis, ensemble):
        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        assert {type(layer) for layer in layers} == {MPSMPairNodes, MPSMSRGRStep}
        assert not model.is_activation_checkpointing
        for enable, disable in (("activation_checkpointing_enable", "activation_checkpointing_disable"),
                                ("gradient_checkpointing_enable", "gradient_checkpointing_disable")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated names
                getattr(model, enable)()
                flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
                assert model.is_activation_checkpointing and len(flags) == len(layers) and all(flags)
                getattr(model, disable)()
                assert not any(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_gives_every_parameter_the_same_gradient(use_reentrant):
    """Every parameter gets a gradient, the same with checkpointing as without, and the checkpointed blocks are
    recomputed in the backward pass (a reentrant checkpoint used to drop the gradients of everything upstream)."""
    options = dict(similarity="joint", streams="both", text_guided_image_features=True, dropout=0.0)
    batch = padded_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_model(**options).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        calls = {"similarity nodes": 0, "SRGR eq 17": 0}
        head = model.heads["t2i_distance"]
        head.local_similarity.register_forward_hook(lambda *_: calls.__setitem__("similarity nodes",
                                                                                 calls["similarity nodes"] + 1))
        head.srgr[0].out_message.register_forward_hook(lambda *_: calls.__setitem__("SRGR eq 17", calls["SRGR eq 17"] + 1))
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
        statistics = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}
        results.append((loss, gradients, statistics, calls))
    (loss, gradients, statistics, calls), (checkpointed_loss, checkpointed, checkpointed_statistics, recomputed) = results
    assert all(gradient is not None for gradient in checkpointed.values())
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, gradient in gradients.items():
        error = (checkpointed[name] - gradient).norm()
        assert error <= 1e-5 * gradient.norm() + 1e-6, (name, error)
    for name, value in statistics.items():  # SRGR's batch norms see each batch once
        torch.testing.assert_close(checkpointed_statistics[name], value, msg=name)
    assert recomputed == {name: 2 * count for name, count in calls.items()} and calls["similarity nodes"] > 1


# --------------------------------------------------------------------------------------------------- outputs
def test_feature_outputs_are_base_model_outputs_with_pooling_as_dict_and_tuple():
    model, ensemble = tiny_models()
    batch = padded_batch()
    with torch.no_grad():
        image = model.encode_image(**image_inputs(batch))
        text = model.encode_text(**text_inputs(batch))
        for features, per_item, nodes, pooled, mask in (
            (model.get_image_features, image_inputs(batch), image.region_embeds, image.image_embeds, image.region_mask),
            (model.get_text_features, text_inputs(batch), text.word_embeds, text.text_embeds, text.attention_mask),
        ):
            output = features(**per_item)
            assert isinstance(output, BaseModelOutputWithPooling) and output.hidden_states is None
            torch.testing.assert_close(output.pooler_output, pooled, rtol=0, atol=0)
            torch.testing.assert_close(output.last_hidden_state, nodes, rtol=0, atol=0)
            as_tuple = features(**per_item, return_dict=False)
            assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
            assert all(torch.equal(a, b) for a, b in zip(as_tuple, output.to_tuple()))
            states = features(**per_item, output_hidden_states=True).hidden_states
            assert len(states) == 1 + TINY["kgid_layers"] and all(state.shape == nodes.shape for state in states)
            # the last KGID layer's output, l2-normalised, is the nodes
            torch.testing.assert_close(F.normalize(states[-1], dim=-1) * mask.unsqueeze(-1), nodes)
            assert len(features(**per_item, output_hidden_states=True, return_dict=False)) == 3
        members = [member.get_text_features(**text_inputs(batch), output_hidden_states=True)
                   for member in ensemble.members().values()]
        output = ensemble.get_text_features(**text_inputs(batch), output_hidden_states=True)
    for field in ("pooler_output", "last_hidden_state"):  # the members' side by side
        torch.testing.assert_close(output[field], torch.cat([member[field] for member in members], -1))
    for state, member_states in zip(output.hidden_states, zip(*(member.hidden_states for member in members))):
        torch.testing.assert_close(state, torch.cat(member_states, -1))


def test_ensemble_hidden_states_need_members_of_one_depth():
    torch.manual_seed(0)
    ensemble = MPSMEnsembleModel(MPSMEnsembleConfig(dis_config=TINY, dir_config={**TINY, "kgid_layers": 3})).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"its members have \[2, 4\] states \(different KGID layers\)"):
        ensemble.get_text_features(**text_inputs(padded_batch()), output_hidden_states=True)


def test_forward_outputs_as_dict_and_tuple_with_hidden_states():
    """As transformers' `test_model_outputs_equivalence`: the tuple is the dict's non-None fields, with and without the
    loss and the hidden states; `config.output_hidden_states` and `config.return_dict` are the defaults."""
    model, ensemble = tiny_models()
    batch = padded_batch()
    with torch.no_grad():
        image = model.encode_image(**image_inputs(batch), output_hidden_states=True)
        text = model.encode_text(**text_inputs(batch), output_hidden_states=True)
        for network, return_loss, output_hidden_states in ((model, False, False), (model, True, True),
                                                           (ensemble, True, True)):
            options = dict(return_loss=return_loss, output_hidden_states=output_hidden_states)
            output = network(**batch, **options)
            as_tuple = network(**batch, **options, return_dict=False)
            assert len(as_tuple) == 4 + return_loss + 2 * output_hidden_states
            assert_same_nested(as_tuple, output.to_tuple())
        output = model(**batch, output_hidden_states=True)
        assert_same_nested(output.image_hidden_states, image.hidden_states)
        assert_same_nested(output.text_hidden_states, text.hidden_states)
        model.config.output_hidden_states, model.config.return_dict = True, False
        assert_same_nested(model(**batch), output.to_tuple())
        model.config.output_hidden_states, model.config.return_dict = False, True


def assert_same_nested(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_nested(x, y)


# --------------------------------------------------------------------------------------------------- export, compile
class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, region_features, boxes, region_mask):
        return self.model.encode_image(region_features, boxes, region_mask)


class TextEncoder(ImageEncoder):
    def forward(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)


class Similarity(ImageEncoder):
    def forward(self, image, text):
        return self.model.similarity(image, text)


def assert_same_outputs(output, expected):
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    else:
        assert output.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(output[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_per_item_encoders_export_with_dynamic_shapes():
    """torch.export of `encode_image` (dynamic images and regions) and `encode_text` (dynamic captions: the BiGRU's
    loop over the words is unrolled, so their length is static); the exported programs give the eager outputs, also
    for other shapes. The input checks that read values are skipped while tracing (eager errors: test_bad_inputs);
    a static export is `test_similarity_exports_and_compiles_in_one_graph`'s."""
    model = tiny_model().eval()
    batch, other = padded_batch(), padded_batch(4, 5, regions=(2, 5, 1, 4), lengths=(6, 1, 3, 6, 2), seed=3)
    images, texts = ImageEncoder(model), TextEncoder(model)
    image_args = tuple(image_inputs(batch).values())
    text_args = (batch["input_ids"], batch["attention_mask"])
    I, n, T = torch.export.Dim("images"), torch.export.Dim("regions"), torch.export.Dim("captions")
    with torch.no_grad():
        for module, args, dynamic, other_args in (
            (images, image_args, ({0: I, 1: n},) * 3, tuple(image_inputs(other).values())),
            (texts, text_args, ({0: T},) * 2, (other["input_ids"], other["attention_mask"])),
        ):
            exported = torch.export.export(module, args, dynamic_shapes=dynamic).module()
            assert_same_outputs(exported(*args), module(*args))
            assert_same_outputs(exported(*other_args), module(*other_args))


def test_similarity_exports_and_compiles_in_one_graph():
    """torch.export of `similarity` (static, and dynamic in images, regions, captions and words) and
    torch.compile(fullgraph=True) give the eager scores: under tracing the captions run as one uncut block (the cuts
    to each block's longest caption read the data). The compile uses the "eager" backend: the graph capture is what
    the data-dependent code broke; inductor's code generation (a minute here) is PyTorch's."""
    model = tiny_model().eval()
    batch, other = padded_batch(3, 4, lengths=(6, 4, 2, 5)), padded_batch(4, 2, regions=(2, 5, 1, 4), seed=3)
    with torch.no_grad():
        image, text = model.encode_image(**image_inputs(batch)), model.encode_text(**text_inputs(batch))
        other_image, other_text = model.encode_image(**image_inputs(other)), model.encode_text(**text_inputs(other))
        reference, other_reference = model.similarity(image, text), model.similarity(other_image, other_text)
        similarity = Similarity(model)
        exported = torch.export.export(similarity, (image, text)).module()
        assert_same_outputs(exported(image, text), reference)
        I, n, T, L = (torch.export.Dim(name) for name in ("images", "regions", "captions", "words"))
        dynamic = ([{0: I, 1: n}, {0: I, 1: n}, {0: I}], [{0: T, 1: L}, {0: T, 1: L}, {0: T}, {0: T, 1: L}])
        exported = torch.export.export(similarity, (image, text), dynamic_shapes=dynamic).module()
        assert_same_outputs(exported(image, text), reference)
        assert_same_outputs(exported(other_image, other_text), other_reference)
        torch._dynamo.reset()
        compiled = torch.compile(model.similarity, fullgraph=True, backend="eager")
        assert_same_outputs(compiled(image, text), reference)


# --------------------------------------------------------------------------------------------------- batching
def test_batching_equivalence():
    """As transformers' `test_batching_equivalence`: each item's per-item outputs and each pair's score are those of
    the item (or pair) alone, whatever the padding of the batch."""
    model, ensemble = tiny_models()
    batch = padded_batch()
    with torch.no_grad():
        for network in (model, ensemble):
            scores = network(**batch).logits_per_image
            images = network.get_image_features(**image_inputs(batch)).pooler_output
            texts = network.get_text_features(**text_inputs(batch)).pooler_output
            alone_images, alone_texts = [], []
            for i, count in enumerate(batch["region_mask"].sum(1).tolist()):
                alone_images.append(network.encode_image(
                    **{name: value[i : i + 1, :count] for name, value in image_inputs(batch).items()}))
                alone = network.get_image_features(**{name: value[i : i + 1, :count]
                                                      for name, value in image_inputs(batch).items()})
                torch.testing.assert_close(alone.pooler_output[0], images[i], rtol=1e-5, atol=1e-6)
            for j, length in enumerate(batch["attention_mask"].sum(1).tolist()):
                caption = {"input_ids": batch["input_ids"][j : j + 1, :length],
                           "dependency_adjacency": batch["dependency_adjacency"][j : j + 1, :length, :length]}
                alone_texts.append(network.encode_text(**caption))
                torch.testing.assert_close(network.get_text_features(**caption).pooler_output[0], texts[j],
                                           rtol=1e-5, atol=1e-6)
            for i, image in enumerate(alone_images):
                for j, text in enumerate(alone_texts):
                    torch.testing.assert_close(network.similarity(image, text)[0, 0], scores[i, j], rtol=1e-5, atol=1e-6)
