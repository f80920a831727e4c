"""Input data for ood_jax: sources, synthetic OOD sets, train/eval iterators, outliers.

Design: the datasets of the papers are CIFAR-scale (at most a few hundred
thousand 32x32 images, 150 MB per 50,000), so every source -- tfds
(prepared as ``array_record`` and read through ``tfds.data_source``), the offline
npz files, image folders, NumPy arrays, synthetic noise -- is materialized once as an in-memory
:class:`ImageDataset` (uint8 ``[N, 32, 32, 3]`` + int32 labels). The pipeline is
then vectorized NumPy on those arrays (one gather per batch for crop + flip, one
multiply-add to normalize) with a background prefetch thread, instead of
tf.data or grain:

* one code path for every source, so offline data is first-class, not a fallback;
* decoding happens once (and is cached on disk), so the hot path has no per-image
  Python and no JPEG work: it runs far above what a train step consumes (see
  ``benchmarks/results/input_pipeline.md``), and each host only gathers its own rows;
* determinism and exact resumption are simple: the batch at global step ``s`` is a
  pure function of ``(seed, s)`` (:mod:`ood_jax.data.pipeline`), so a checkpoint
  stores one integer, and the global batch does not depend on the process count;
* TensorFlow is not needed to read data: only tfds's builders need it, once, to
  prepare a tfds dataset (``pip install 'ood_jax[prepare]'``); a TPU runtime
  without TensorFlow reads prepared tfds datasets and the offline files.

A training split can also live on the devices instead (:mod:`ood_jax.data.device`,
imported on its own: it needs JAX): placed once on the mesh, each batch made inside the
train step from the step's plan (:class:`PlanIterator`: rows, crop, flip), the same
batches bit for bit.

Batches are ``{"image": float32 [b, 32, 32, 3], "label": int32 [b], "mask": bool [b]}``
per process, normalized with the dataset's constants (:data:`CIFAR10_MEAN` /
:data:`CIFAR10_STD` by default). Datasets are found by name in
:mod:`ood_jax.data.registry` (:func:`register_dataset` adds one).
"""

from ood_jax.data.dataset import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDataset,
    denormalize,
    from_arrays,
    normalize,
    random_subset,
)
from ood_jax.data.outliers import load_outliers, outlier_iterator
from ood_jax.data.pipeline import (
    EvalBatches,
    PlanIterator,
    TrainIterator,
    eval_batches,
    shard_bounds,
    train_iterator,
    train_plans,
)
from ood_jax.data.registry import (
    DatasetSpec,
    available_datasets,
    get_dataset_spec,
    load_dataset,
    register_dataset,
    spec_for_source,
)
from ood_jax.data.sources import (
    DatasetUnavailableError,
    default_data_dir,
    from_folder,
    from_image_files,
    from_npz,
    from_tfds,
)
from ood_jax.data.synthetic import (
    SYNTHETIC_OOD_SETS,
    make_blobs,
    make_gaussian_noise,
    make_lowpass_uniform_noise,
    make_permuted_pixels,
    make_rademacher_noise,
    make_synthetic,
    make_uniform_noise,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DatasetSpec",
    "DatasetUnavailableError",
    "SYNTHETIC_OOD_SETS",
    "EvalBatches",
    "ImageDataset",
    "PlanIterator",
    "TrainIterator",
    "available_datasets",
    "default_data_dir",
    "denormalize",
    "eval_batches",
    "from_arrays",
    "random_subset",
    "from_folder",
    "from_image_files",
    "from_npz",
    "from_tfds",
    "get_dataset_spec",
    "load_dataset",
    "load_outliers",
    "make_blobs",
    "make_gaussian_noise",
    "make_lowpass_uniform_noise",
    "make_permuted_pixels",
    "make_rademacher_noise",
    "make_synthetic",
    "make_uniform_noise",
    "normalize",
    "outlier_iterator",
    "register_dataset",
    "shard_bounds",
    "spec_for_source",
    "train_iterator",
    "train_plans",
]
