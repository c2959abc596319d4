"""Configuration of MPSM (Multi-Perspective Similarity Modeling, UAI 2022) and of its dis/dir ensemble (MPSM*)."""

from typing import NamedTuple

from transformers import PretrainedConfig


# The similarity perspectives (eq 10-15) by name, with the short name of their model ("dis", "dir"): it names their
# published variant and their member of the ensemble (MPSM*). Their classes are `SIMILARITY_REPRESENTATIONS` in
# modeling_mpsm.py. A configuration stores the perspectives it was built with (`MPSMConfig.joint_perspectives`,
# `MPSMEnsembleConfig.members`), so that a checkpoint keeps its own when this table grows.
PERSPECTIVES = {"distance": "dis", "direction": "dir"}
# The perspectives of every joint model and ensemble saved before their configurations stored them.
PERSPECTIVES_BEFORE_STORED = ("distance", "direction")


class Range(NamedTuple):
    """The rule of a numeric setting: an `int` or a `float` in [low, high] ((low, high] with `low_excluded`; no upper
    bound when `high` is None)."""

    type: type
    low: float
    high: float | None = None
    low_excluded: bool = False


FLAG = (True, False)
# What each setting of MPSMConfig may hold (checked in this order by `checked_setting`): a `Range`, or its choices.
FIELD_RULES = {
    "img_dim": Range(int, 1),
    "vocab_size": Range(int, 5),
    "word_dim": Range(int, 1),
    "embed_size": Range(int, 2),
    "sim_dim": Range(int, 1),
    "kgid_layers": Range(int, 0, 16),
    "srgr_steps": Range(int, 0, 16),
    "num_spatial_kernels": Range(int, 1, 64),
    "visual_kgid": FLAG,
    "textual_kgid": FLAG,
    "use_srgr": FLAG,
    "max_violation": FLAG,
    "hinge_on_logits": FLAG,
    "kgid_gate": FLAG,
    "spatial_prior": FLAG,
    "spatial_messages": FLAG,
    "word_self_attention": FLAG,
    "text_guided_image_features": FLAG,
    "alignment": ("global", "local", "multi"),
    "similarity": (*PERSPECTIVES, "joint"),
    "loss_type": ("triplet", "fine_grained_labels", "both"),
    "streams": ("t2i", "i2t", "both"),
    "lambda_softmax": Range(float, 0.0, low_excluded=True),
    "margin": Range(float, 0.0, 2.0),
    "dropout": Range(float, 0.0, 0.9),
    "global_loss_weight": Range(float, 0.0),
    "global_loss_temperature": Range(float, 0.0, low_excluded=True),
    "initializer_range": Range(float, 0.0, low_excluded=True),
}


def checked_setting(name: str, value):
    """`value` for the setting `name` (a float setting as a float) if it follows its rule of `FIELD_RULES`, else a
    `ValueError` naming the setting and what it may hold."""
    rule = FIELD_RULES[name]
    if not isinstance(rule, Range):
        if value not in rule:
            raise ValueError(f"`{name}` must be one of {list(rule)}, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.type is float and not number:
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    above_low = number and (value > rule.low if rule.low_excluded else value >= rule.low)  # False for NaN
    if not (above_low and (rule.high is None or value <= rule.high) and (rule.type is float or isinstance(value, int))):
        if rule.type is int:
            allowed = f"an integer >= {rule.low}" if rule.high is None else f"an integer in [{rule.low}, {rule.high}]"
        else:
            high = "inf)" if rule.high is None else f"{rule.high}]"
            allowed = f"in {'(' if rule.low_excluded else '['}{rule.low}, {high}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return rule.type(value)


class MPSMConfig(PretrainedConfig):
    r"""
    Configuration of [`MPSMModel`]. Defaults are the paper's settings for Flickr30K (§4.1) with the distance
    perspective, i.e. the `dis` model.

    Args:
        img_dim (`int`, 2048): width of the precomputed region features (BUTD Faster R-CNN: 2048).
        vocab_size (`int`, 8481): size of the word vocabulary (SCAN's Flickr30K vocabulary: 8481).
        word_dim (`int`, 300): width of the word embeddings fed to the BiGRU.
        embed_size (`int`, 1024): width d of the joint region/word space.
        sim_dim (`int`, 256): width m of the similarity representations (eq 10-15).
        kgid_layers (`int`, 3): number N of KGID layers (eq 5-9); 0 removes KGID (Table 3).
        visual_kgid / textual_kgid (`bool`): switch KGID per modality (Table 2: w/o V-KGID, w/o T-KGID).
        kgid_gate (`bool`): the knowledge gate of eq 6-7; `False` (ablation) lets the disseminated knowledge replace
            each node.
        spatial_prior (`bool`): the visual spatial prior P_v from the boxes (eq 3); `False` (ablation) uses P_v = 1.
        spatial_messages (`bool`, beyond the paper): before the visual knowledge graph, each region receives what the
            regions inside its box hold (an item's appearance reaches its owner's node); the identity at
            initialisation. `MPSMSpatialMessages` argues it.
        srgr_steps (`int`, 3): rounds of similarity-relation graph reconstruction (eq 16-20).
        use_srgr (`bool`): `False` scores the similarity nodes without reasoning (Table 2: w/o SRGR).
        alignment (`str`): "global" (only v̄-t̄), "local" (only word-region nodes) or "multi" (both, the paper's).
        similarity (`str`): a perspective of `PERSPECTIVES`: "distance" (MPSM dis), "direction" (MPSM dir), or
            "joint" (several perspectives' heads in one model, loss L_dis + L_dir, score their mean).
        joint_perspectives (`list[str]`, *optional*): the perspectives of a joint model (at least two of
            `PERSPECTIVES`, in order); default: every one of `PERSPECTIVES`. Stored, so that a joint checkpoint keeps
            its heads when `PERSPECTIVES` grows; None unless `similarity="joint"`.
        lambda_softmax (`float`, 9.0): temperature λ of the graph edges (eq 1, 9) and of the text-guided attention.
        margin (`float`, 0.2): triplet margin γ (eq 21).
        max_violation (`bool`): hardest negatives in the batch (VSE++); `False` sums all violations.
        hinge_on_logits (`bool`): the triplet hinge of eq 21 on the logits before σ (the default; rankings are the
            same, σ being monotone, and the hinge keeps its gradient where σ saturates); `False` hinges the σ scores,
            as eq 21 is printed (kept for the checkpoints trained that way and the comparison of the two).
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
        vocab_size=8481,
        word_dim=300,
        embed_size=1024,
        sim_dim=256,
        kgid_layers=3,
        visual_kgid=True,
        textual_kgid=True,
        kgid_gate=True,
        spatial_prior=True,
        spatial_messages=False,
        srgr_steps=3,
        use_srgr=True,
        alignment="multi",
        similarity="distance",
        joint_perspectives=None,
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
        settings = locals()
        for name in FIELD_RULES:
            setattr(self, name, checked_setting(name, settings[name]))
        self.joint_perspectives = self._joint_perspectives(joint_perspectives)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PretrainedConfig.from_dict`; a joint configuration saved before `joint_perspectives` was stored gets the
        perspectives of that time, `PERSPECTIVES_BEFORE_STORED` (not every perspective of today's table)."""
        if config_dict.get("similarity") == "joint" and "joint_perspectives" not in config_dict:
            config_dict = {**config_dict, "joint_perspectives": list(PERSPECTIVES_BEFORE_STORED)}
        return super().from_dict(config_dict, **kwargs)

    def _joint_perspectives(self, value):
        if self.similarity != "joint":
            if value is not None:
                raise ValueError(f"`joint_perspectives` applies to similarity='joint', got similarity={self.similarity!r}")
            return None
        if value is None:
            return list(PERSPECTIVES)
        if (isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) < 2
                or len(set(value)) != len(value) or not set(value) <= set(PERSPECTIVES)):
            raise ValueError(f"`joint_perspectives` must list at least two distinct perspectives of "
                             f"{list(PERSPECTIVES)}, got {value!r}")
        return list(value)

    @property
    def perspectives(self):
        """The similarity perspectives this model scores with: ("distance",), ("direction",) or, for "joint", those of
        `joint_perspectives`."""
        return tuple(self.joint_perspectives) if self.similarity == "joint" else (self.similarity,)

    @property
    def stream_names(self):
        """The similarity streams: ("t2i",), ("i2t",) or both (two-stream reasoning)."""
        return {"t2i": ("t2i",), "i2t": ("i2t",), "both": ("t2i", "i2t")}[self.streams]


class MPSMEnsembleConfig(PretrainedConfig):
    r"""
    Configuration of [`MPSMEnsembleModel`] (MPSM*): one model per perspective, whose scores are averaged. Each member's
    configuration is the field `<short name>_config`.

    Args:
        members (`list[str]`, *optional*): the members' short names (values of `PERSPECTIVES`), in order; default:
            those whose `<short name>_config` is given, or every perspective of `PERSPECTIVES` when none is. Stored, so
            that an ensemble checkpoint keeps its members when `PERSPECTIVES` grows.
        dis_config (`dict` or `MPSMConfig`): configuration of the distance member.
        dir_config (`dict` or `MPSMConfig`): configuration of the direction member.
    """

    model_type = "mpsm_ensemble"
    # every perspective's field; those of perspectives that are not members hold None
    sub_configs = {f"{name}_config": MPSMConfig for name in PERSPECTIVES.values()}

    def __init__(self, members=None, **kwargs):
        perspectives = {name: perspective for perspective, name in PERSPECTIVES.items()}  # "dis" -> "distance"
        given = [name for name in perspectives if kwargs.get(f"{name}_config") is not None]
        self.members = self._members(list(given or perspectives) if members is None else members, perspectives)
        for name, perspective in perspectives.items():
            field, config = f"{name}_config", kwargs.pop(f"{name}_config", None)
            if name not in self.members and config is not None:
                raise ValueError(f"`{field}` is given but {name!r} is not a member: `members` is {self.members}")
            setattr(self, field, self._member(config, perspective, field) if name in self.members else None)
        for field, reads in (("vocab_size", "input_ids"), ("img_dim", "region_features")):
            sizes = {f"{name}.{field}": getattr(config, field) for name, config in self.member_configs.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"the members' {field} {sizes} must match: every member reads the same "
                                 f"processor's {reads}")
        super().__init__(**kwargs)

    @property
    def member_configs(self):
        """The members' configurations by short name: {"dis": MPSMConfig, "dir": MPSMConfig}."""
        return {name: getattr(self, f"{name}_config") for name in self.members}

    @staticmethod
    def _members(members, perspectives):
        if (isinstance(members, str) or not isinstance(members, (list, tuple)) or not members
                or len(set(members)) != len(members) or not set(members) <= set(perspectives)):
            raise ValueError(f"`members` must list distinct short names of {list(perspectives)}, got {members!r}")
        return list(members)

    @staticmethod
    def _member(config, similarity, name):
        if config is None:
            config = MPSMConfig(similarity=similarity)
        elif isinstance(config, dict):
            config = MPSMConfig(**{**config, "similarity": config.get("similarity", similarity)})
        elif not isinstance(config, MPSMConfig):
            raise ValueError(f"`{name}` must be a dict or an MPSMConfig, got {type(config).__name__}")
        return config
