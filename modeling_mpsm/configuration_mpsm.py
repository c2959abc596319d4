"""Configuration of MPSM (Multi-Perspective Similarity Modeling, UAI 2022) and of its dis/dir ensemble (MPSM*)."""

from transformers import PretrainedConfig


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def _check_float(name, value, low, high=None, low_inclusive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    below = value < low if low_inclusive else value <= low
    if below or (high is not None and value > high):
        bracket = "[" if low_inclusive else "("
        allowed = f"{bracket}{low}, {high}]" if high is not None else f"{bracket}{low}, inf)"
        raise ValueError(f"`{name}` must be in {allowed}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")


class MPSMConfig(PretrainedConfig):
    r"""
    Configuration of [`MPSMModel`]. Defaults are the paper's settings for Flickr30K (§4.1) with the distance
    perspective, i.e. the `dis` model.

    Args:
        img_dim (`int`, 2048): width of the precomputed region features (BUTD Faster R-CNN: 2048).
        num_regions (`int`, 36): regions per image the processor pads or truncates to.
        vocab_size (`int`, 8481): size of the word vocabulary (SCAN's Flickr30K vocabulary: 8481).
        word_dim (`int`, 300): width of the word embeddings fed to the BiGRU.
        embed_size (`int`, 1024): width d of the joint region/word space.
        sim_dim (`int`, 256): width m of the similarity representations (eq 10-15).
        kgid_layers (`int`, 3): number N of KGID layers (eq 5-9); 0 removes KGID (Table 3).
        visual_kgid / textual_kgid (`bool`): switch KGID per modality (Table 2: w/o V-KGID, w/o T-KGID).
        kgid_gate (`bool`): the knowledge gate of eq 6-7; `False` (ablation) lets the disseminated knowledge replace
            each node.
        spatial_prior (`bool`): the visual spatial prior P_v from the boxes (eq 3); `False` (ablation) uses P_v = 1.
        srgr_steps (`int`, 3): rounds of similarity-relation graph reconstruction (eq 16-20).
        use_srgr (`bool`): `False` scores the similarity nodes without reasoning (Table 2: w/o SRGR).
        alignment (`str`): "global" (only v̄-t̄), "local" (only word-region nodes) or "multi" (both, the paper's).
        similarity (`str`): "distance" (MPSM dis), "direction" (MPSM dir) or "joint" (both heads in one model,
            loss L_dis + L_dir, score their mean).
        lambda_softmax (`float`, 9.0): temperature λ of the graph edges (eq 1, 9) and of the text-guided attention.
        margin (`float`, 0.2): triplet margin γ (eq 21).
        max_violation (`bool`): hardest negatives in the batch (VSE++); `False` sums all violations.
        hinge_on_logits (`bool`): the triplet hinge of eq 21 on the logits before σ (the default; rankings are the
            same, σ being monotone, and the hinge keeps its gradient where σ saturates); `False` hinges the σ scores.
        num_spatial_kernels (`int`, 8): Gaussian kernels K over the polar coordinates of box offsets.
        dropout (`float`, 0.1): dropout in the global self-attention.
        global_loss_weight (`float`, 0.0): weight of an auxiliary InfoNCE loss on (v̄, t̄) that trains the
            first stage of two-stage retrieval; 0 is the paper's model.
        global_loss_temperature (`float`, 0.05): temperature of that loss.
        loss_type (`str`): "triplet" (eq 21), "fine_grained_labels" (pairwise loss with soft labels from a siamese
            text network) or "both" (their sum).
        streams (`str`): "t2i" (the paper: words attend to regions), "i2t" (regions attend to words) or "both"
            (two-stream reasoning; scores averaged).
        word_self_attention (`bool`): self-attention over words that re-weights uninformative words before
            matching (hierarchical correspondences).
        text_guided_image_features (`bool`): cross-attention gating of the region features by the caption before
            matching (hierarchical correspondences).
        initializer_range (`float`): unused by the Xavier init of linear layers; std of the word embedding init.
    """

    model_type = "mpsm"

    def __init__(
        self,
        img_dim=2048,
        num_regions=36,
        vocab_size=8481,
        word_dim=300,
        embed_size=1024,
        sim_dim=256,
        kgid_layers=3,
        visual_kgid=True,
        textual_kgid=True,
        kgid_gate=True,
        spatial_prior=True,
        srgr_steps=3,
        use_srgr=True,
        alignment="multi",
        similarity="distance",
        lambda_softmax=9.0,
        margin=0.2,
        max_violation=True,
        hinge_on_logits=True,
        num_spatial_kernels=8,
        dropout=0.1,
        global_loss_weight=0.0,
        global_loss_temperature=0.05,
        loss_type="triplet",
        streams="t2i",
        word_self_attention=False,
        text_guided_image_features=False,
        initializer_range=0.1,
        **kwargs,
    ):
        _check_int("img_dim", img_dim, 1)
        _check_int("num_regions", num_regions, 1)
        _check_int("vocab_size", vocab_size, 5)
        _check_int("word_dim", word_dim, 1)
        _check_int("embed_size", embed_size, 2)
        _check_int("sim_dim", sim_dim, 1)
        _check_int("kgid_layers", kgid_layers, 0, 16)
        _check_int("srgr_steps", srgr_steps, 0, 16)
        _check_int("num_spatial_kernels", num_spatial_kernels, 1, 64)
        _check_choice("visual_kgid", visual_kgid, (True, False))
        _check_choice("textual_kgid", textual_kgid, (True, False))
        _check_choice("use_srgr", use_srgr, (True, False))
        _check_choice("max_violation", max_violation, (True, False))
        _check_choice("hinge_on_logits", hinge_on_logits, (True, False))
        _check_choice("kgid_gate", kgid_gate, (True, False))
        _check_choice("spatial_prior", spatial_prior, (True, False))
        _check_choice("word_self_attention", word_self_attention, (True, False))
        _check_choice("text_guided_image_features", text_guided_image_features, (True, False))
        _check_choice("alignment", alignment, ("global", "local", "multi"))
        _check_choice("similarity", similarity, ("distance", "direction", "joint"))
        _check_choice("loss_type", loss_type, ("triplet", "fine_grained_labels", "both"))
        _check_choice("streams", streams, ("t2i", "i2t", "both"))
        _check_float("lambda_softmax", lambda_softmax, 0.0, low_inclusive=False)
        _check_float("margin", margin, 0.0, 2.0)
        _check_float("dropout", dropout, 0.0, 0.9)
        _check_float("global_loss_weight", global_loss_weight, 0.0)
        _check_float("global_loss_temperature", global_loss_temperature, 0.0, low_inclusive=False)
        _check_float("initializer_range", initializer_range, 0.0, low_inclusive=False)

        self.img_dim = img_dim
        self.num_regions = num_regions
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.embed_size = embed_size
        self.sim_dim = sim_dim
        self.kgid_layers = kgid_layers
        self.visual_kgid = visual_kgid
        self.textual_kgid = textual_kgid
        self.kgid_gate = kgid_gate
        self.spatial_prior = spatial_prior
        self.srgr_steps = srgr_steps
        self.use_srgr = use_srgr
        self.alignment = alignment
        self.similarity = similarity
        self.lambda_softmax = float(lambda_softmax)
        self.margin = float(margin)
        self.max_violation = max_violation
        self.hinge_on_logits = hinge_on_logits
        self.num_spatial_kernels = num_spatial_kernels
        self.dropout = float(dropout)
        self.global_loss_weight = float(global_loss_weight)
        self.global_loss_temperature = float(global_loss_temperature)
        self.loss_type = loss_type
        self.streams = streams
        self.word_self_attention = word_self_attention
        self.text_guided_image_features = text_guided_image_features
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)

    @property
    def perspectives(self):
        """The similarity perspectives this model scores with: ("distance",), ("direction",) or both."""
        return {"distance": ("distance",), "direction": ("direction",), "joint": ("distance", "direction")}[
            self.similarity
        ]

    @property
    def stream_names(self):
        """The similarity streams: ("t2i",), ("i2t",) or both (two-stream reasoning)."""
        return {"t2i": ("t2i",), "i2t": ("i2t",), "both": ("t2i", "i2t")}[self.streams]


class MPSMEnsembleConfig(PretrainedConfig):
    r"""
    Configuration of [`MPSMEnsembleModel`] (MPSM*): a `dis` and a `dir` model whose scores are averaged.

    Args:
        dis_config (`dict` or `MPSMConfig`): configuration of the distance member.
        dir_config (`dict` or `MPSMConfig`): configuration of the direction member.
    """

    model_type = "mpsm_ensemble"
    sub_configs = {"dis_config": MPSMConfig, "dir_config": MPSMConfig}

    def __init__(self, dis_config=None, dir_config=None, **kwargs):
        self.dis_config = self._member(dis_config, "distance", "dis_config")
        self.dir_config = self._member(dir_config, "direction", "dir_config")
        if self.dis_config.vocab_size != self.dir_config.vocab_size:
            raise ValueError(
                f"`dis_config.vocab_size` ({self.dis_config.vocab_size}) and `dir_config.vocab_size` "
                f"({self.dir_config.vocab_size}) must match: both members read the same processor's input_ids"
            )
        super().__init__(**kwargs)

    @staticmethod
    def _member(config, similarity, name):
        if config is None:
            config = MPSMConfig(similarity=similarity)
        elif isinstance(config, dict):
            config = MPSMConfig(**{**config, "similarity": config.get("similarity", similarity)})
        elif not isinstance(config, MPSMConfig):
            raise ValueError(f"`{name}` must be a dict or an MPSMConfig, got {type(config).__name__}")
        return config
