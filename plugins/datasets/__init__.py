"""First-party dataset plugins. Light: the loaders are imported only when a dataset is used."""

from __future__ import annotations

from hvae_core import hookimpl

from .options import (
    Cifar10Options,
    ImageFolderOptions,
    ImageNetOptions,
    MnistOptions,
)


@hookimpl
def register_datasets(register):  # noqa: ANN001 - the hook's register callable
    register(
        "digits",
        "hvae_plugins.datasets.digits:load_digits_dataset",
        summary="scikit-learn's 8x8 handwritten digits (1,797 images, shipped, offline)",
        image_size=8,
    )
    register(
        "cifar10",
        "hvae_plugins.datasets.cifar10:load_cifar10",
        options=Cifar10Options,
        summary="CIFAR-10 32x32, python release; VDVAE's 45k/5k train/val split, official test",
        image_size=32,
    )
    register(
        "imagenet32",
        "hvae_plugins.datasets.imagenet:load_imagenet32",
        options=ImageNetOptions,
        summary="downsampled ImageNet 32x32 (.npy or npz release), memory-mapped; VDVAE splits",
        image_size=32,
    )
    register(
        "imagenet64",
        "hvae_plugins.datasets.imagenet:load_imagenet64",
        options=ImageNetOptions,
        summary="downsampled ImageNet 64x64 (.npy or npz release), memory-mapped; VDVAE splits",
        image_size=64,
    )
    register(
        "mnist",
        "hvae_plugins.datasets.mnist:load_mnist",
        options=MnistOptions,
        summary="MNIST from its IDX files, padded or resized; optional dynamic binarisation",
    )
    register(
        "image-folder",
        "hvae_plugins.datasets.image_folder:load_image_folder",
        options=ImageFolderOptions,
        summary="any folder tree of PNG/JPEG images (e.g. FFHQ), resized, cached as .npy",
    )
