"""The SCAN/GSMN precomputed-feature format, read and checked (the package's one reader of data files).

A SCAN-format directory holds, per split (`train`, `dev`, `test`, `testall` for COCO 5K, ...):

- `{split}_ims.npy`: float `[N, R, D]` region features (BUTD: R = 36, D = 2048)
- `{split}_caps.txt`: UTF-8, one caption per line, five consecutive lines per image
- `{split}_ims_bbx.npy` (optional): `[N, R, 4]` boxes `(x1, y1, x2, y2)`, in pixels or already in [0, 1]
- `{split}_ims_size.npy` (optional): `[N, 2]` image `(w, h)`

As in SCAN's loader, the feature array may instead repeat each image five times (one row per caption). Every check
of a data file (truncation, shapes, encodings, box ranges) is made here, naming the file.
"""

import os

import numpy as np

from ..common import CAPTIONS_PER_IMAGE


def _open_npy(path: str) -> np.memmap:
    """Memory-map a `.npy` file, checking that it holds as many bytes as its header promises."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a valid .npy file: {error}") from error
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise ValueError(f"{path} is truncated: its header announces shape {shape} ({expected} bytes), the file has {actual}.")
    return np.load(path, mmap_mode="r")


def _read_captions(path: str) -> list[str]:
    """Captions of a `_caps.txt` file, one per line; a line that is not UTF-8 raises naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    captions = []
    for number, line in enumerate(lines, start=1):
        try:
            captions.append(line.decode("utf-8").strip())
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid UTF-8 ({error}).") from error
    return captions


class ScanSplit:
    """One split of a SCAN-format directory, with the features memory-mapped (never read whole).

    Attributes:
        images (`np.memmap` `[N, R, D]`): region features of the N distinct images.
        captions (`list[str]`): `5 * N` captions; captions `5i .. 5i + 4` describe image `i`.
        boxes (`np.ndarray` `[N, R, 4]` or `None`): region boxes as stored (pixels or [0, 1]).
        image_sizes (`np.ndarray` `[N, 2]` or `None`): image `(w, h)`.
    """

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = str(data_dir), split
        self.images_path = self.path("ims.npy")
        self.captions_path = self.path("caps.txt")
        for path in (self.images_path, self.captions_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Split {split!r} of {self.data_dir}: expected file {path} does not exist.")
        rows = _open_npy(self.images_path)
        if rows.ndim != 3:
            raise ValueError(f"{self.images_path} must hold [images, regions, features], got shape {rows.shape}.")
        self.captions = _read_captions(self.captions_path)
        num_rows, num_captions = len(rows), len(self.captions)
        if num_rows and num_captions == CAPTIONS_PER_IMAGE * num_rows:
            stride = 1
        elif num_rows and num_captions == num_rows and num_rows % CAPTIONS_PER_IMAGE == 0:
            stride = CAPTIONS_PER_IMAGE  # SCAN's "im_div": each image repeated once per caption
        else:
            raise ValueError(
                f"{self.captions_path} has {num_captions} captions for {num_rows} feature rows in {self.images_path}: "
                f"expected {CAPTIONS_PER_IMAGE} captions per image (or one per row, with each image repeated "
                f"{CAPTIONS_PER_IMAGE} times)."
            )
        self.images = rows[::stride]
        self.boxes = self._optional("ims_bbx.npy", (num_rows, rows.shape[1], 4), stride)
        self.image_sizes = self._optional("ims_size.npy", (num_rows, 2), stride)

    def path(self, suffix: str) -> str:
        return os.path.join(self.data_dir, f"{self.split}_{suffix}")

    def _optional(self, suffix: str, shape: tuple[int, ...], stride: int) -> np.ndarray | None:
        path = self.path(suffix)
        if not os.path.isfile(path):
            return None
        array = _open_npy(path)
        if array.shape != shape:
            raise ValueError(f"{path} has shape {array.shape}, but {self.images_path} implies {shape}.")
        return np.asarray(array[::stride], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_regions(self) -> int:
        return self.images.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.images.shape[2]

    def region_features(self, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Features of images `start:stop` as `dtype` `[stop - start, R, D]`, checked finite in that dtype."""
        features = np.asarray(self.images[start:stop], dtype=dtype)
        bad = ~np.isfinite(features).all(axis=(1, 2))  # NaN/Inf in the file, or values beyond the dtype's range
        if bad.any():
            raise ValueError(
                f"{self.images_path}: images {(start + np.flatnonzero(bad)).tolist()} have NaN, Inf or values beyond "
                f"the {np.dtype(dtype).name} range (|x| > {np.finfo(dtype).max:.6g}); expected finite region features."
            )
        return features

    def normalized_boxes(self, start: int, stop: int) -> np.ndarray | None:
        """Boxes of images `start:stop` in [0, 1], float32 `[stop - start, R, 4]`, or `None` without a box file."""
        if self.boxes is None:
            return None
        boxes = self.boxes[start:stop]
        bad = ~np.isfinite(boxes).all(axis=(1, 2)) | (boxes[..., 2] < boxes[..., 0]).any(1) | (boxes[..., 3] < boxes[..., 1]).any(1)
        if bad.any():
            raise ValueError(
                f"{self.path('ims_bbx.npy')}: images {(start + np.flatnonzero(bad)).tolist()} have boxes that are not "
                "finite (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1."
            )
        if self.image_sizes is not None:
            width_height = np.maximum(self.image_sizes[start:stop], 1.0)
            boxes = boxes / np.tile(width_height, 2)[:, None, :]
        elif boxes.size and boxes.max() > 1.0 + 1e-3:
            raise ValueError(f"{self.path('ims_bbx.npy')} holds pixel boxes but {self.path('ims_size.npy')} is missing.")
        outside = ((boxes < -0.01) | (boxes > 1.01)).any(axis=(1, 2))  # detector rounding is clipped, more is an error
        if outside.any():
            raise ValueError(
                f"{self.path('ims_bbx.npy')}: images {(start + np.flatnonzero(outside)).tolist()} have boxes outside "
                f"the image (of {self.path('ims_size.npy')} when present, else [0, 1])."
            )
        return np.clip(boxes, 0.0, 1.0).astype(np.float32)

    def fingerprint(self) -> list:
        """Names, sizes and modification times of the input files (what a cached conversion depends on)."""
        names = ("ims.npy", "caps.txt", "ims_bbx.npy", "ims_size.npy")
        stats = [(self.path(n), os.stat(self.path(n))) for n in names if os.path.isfile(self.path(n))]
        return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns] for path, stat in stats]
