"""Recall@K for image-text retrieval from an image x caption similarity matrix (SCAN's i2t / t2i), as an `evaluate`
metric. Load it offline from its folder: `evaluate.load(modeling_mpsm.metrics.RECALL_AT_K)` from any directory."""

import datasets
import evaluate

from .ranking import CAPTIONS_PER_IMAGE, RECALL_KS, retrieval_recalls


_DESCRIPTION = """
Recall@K of image-to-text and text-to-image retrieval, and their sum (rsum), from a similarity matrix
`[N_img, 5 * N_img]` whose captions `5i .. 5i + 4` describe image `i`. Image-to-text ranks the best of an image's five
captions among all captions; text-to-image ranks a caption's image among all images. Ties count against the model.
"""

_KWARGS_DESCRIPTION = """
Args:
    similarities (`list[list[float]]` or array `[N_img, captions_per_image * N_img]`): one row per image, its scores
        against every caption. Rows may be added in several `add_batch` calls, in image order.
    captions_per_image (`int`, defaults to 5): captions per image, consecutive in each row.
    ks (`list[int]`, defaults to [1, 5, 10]): the K of R@K.
Returns:
    `i2t_r{k}` and `t2i_r{k}` for each k (percent), and `rsum`.
Example:
    >>> metric = evaluate.load(modeling_mpsm.metrics.RECALL_AT_K)
    >>> metric.compute(similarities=[[0.9, 0.1, 0.2, 0.1, 0.3, 0.1, 0.0, 0.2, 0.1, 0.3]], captions_per_image=5)
"""

_CITATION = """
@inproceedings{lee2018stacked,
  title={Stacked Cross Attention for Image-Text Matching},
  author={Lee, Kuang-Huei and Chen, Xi and Hua, Gang and Hu, Houdong and He, Xiaodong},
  booktitle={ECCV}, year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Image-text retrieval Recall@K and rsum."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"similarities": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, similarities, captions_per_image=CAPTIONS_PER_IMAGE, ks=RECALL_KS):
        return retrieval_recalls(similarities, captions_per_image, tuple(ks))
