"""First-party datasets: tiny files in each real format, loaded the way the CLI loads them."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hvae_plugins.datasets import cifar10, image_folder, imagenet, mnist
from PIL import Image

from hvae_core.cli import cli
from hvae_core.config import load_run_config, resolve_config
from hvae_core.data import DATA_DIR_ENV, InMemoryDataset, LazyImages, open_dataset
from hvae_core.errors import ConfigError, HvaeError
from hvae_core.interfaces import Dataset
from hvae_core.options import option
from hvae_core.plugins import get_registry
from hvae_core.testing import temporary_plugin


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def open_ds(dataset: str, data_dir: Path | None = None, *overrides: str) -> Dataset:
    """The dataset exactly as ``hvae train --dataset D --data-dir DIR --set ...`` opens it."""
    flags = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None}
    return open_dataset(resolve_config(flags=flags, overrides=list(overrides)))


def chw_rows(images_nhwc: np.ndarray) -> np.ndarray:
    """NHWC images as the releases store them: flattened CHW rows."""
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def rgb_planes_image(size: int) -> np.ndarray:
    """One NHWC image whose R, G and B planes are the constants 10, 20 and 30."""
    return np.broadcast_to(np.array([10, 20, 30], np.uint8), (1, size, size, 3)).copy()


def random_images(n: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


# --------------------------------------------------------------------------------------------
# CIFAR-10: pickles written the way Python 2's cPickle wrote the release


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: every str (ours: bytes and str) as a BINSTRING."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("utf-8") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: object, numpy_module: str = "numpy.core.multiarray") -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The GLOBAL opcode is newline-terminated text: numpy 2 names numpy._core, the release
    # (numpy 1 era) names numpy.core.
    return buf.getvalue().replace(
        b"cnumpy._core.multiarray\n", f"c{numpy_module}\n".encode("ascii")
    )


def cifar_batch(rows: np.ndarray, label: str, numpy_module: str = "numpy.core.multiarray") -> bytes:
    return py2_pickle(
        {
            b"batch_label": label.encode(),
            b"labels": [int(i % 10) for i in range(len(rows))],
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))],
        },
        numpy_module,
    )


def write_cifar(
    root: Path,
    *,
    per_batch: int = 4,
    n_test: int = 3,
    tar: bool = False,
    numpy_module: str = "numpy.core.multiarray",
) -> tuple[np.ndarray, np.ndarray]:
    """The release under ``root`` (extracted folder, or the .tar.gz); returns the NHWC images."""
    train = random_images(5 * per_batch, 32, seed=1)
    train[0] = rgb_planes_image(32)[0]
    test = random_images(n_test, 32, seed=2)
    files = {
        f"data_batch_{i + 1}": cifar_batch(
            chw_rows(train[i * per_batch : (i + 1) * per_batch]),
            f"training batch {i + 1} of 5",
            numpy_module,
        )
        for i in range(5)
    }
    files["test_batch"] = cifar_batch(chw_rows(test), "testing batch 1 of 1", numpy_module)
    files["batches.meta"] = py2_pickle({b"label_names": [b"airplane"], b"num_vis": 3072})
    root.mkdir(parents=True, exist_ok=True)
    if tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as archive:
            for name, payload in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    else:
        (root / "cifar-10-batches-py").mkdir()
        for name, payload in files.items():
            (root / "cifar-10-batches-py" / name).write_bytes(payload)
    return train, test


@pytest.fixture
def small_cifar_val(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cifar10, "VAL_SIZE", 5)
    return 5


def test_cifar10_split_constants_are_vdvaes() -> None:
    assert (cifar10.VAL_SIZE, cifar10.SPLIT_SEED) == (5000, 11172018)


def test_cifar10_folder_loads_vdvae_splits_exactly(tmp_path: Path, small_cifar_val: int) -> None:
    from sklearn.model_selection import train_test_split

    train, test = write_cifar(tmp_path)
    ds = open_ds("cifar10", tmp_path)
    assert isinstance(ds, Dataset)
    assert ds.image_shape == (32, 32, 3) and ds.num_bits == 8
    assert ds.splits == ("train", "val", "test")
    # The oracle is VDVAE's own call on the stacked images.
    want_train, want_val = train_test_split(train, test_size=5, random_state=11172018)
    for split, want in [("train", want_train), ("val", want_val), ("test", test)]:
        got = ds.load(split)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert len(ds.load("train")) == 15 and len(ds.load("val")) == 5


def test_cifar10_chw_rows_become_hwc_images(tmp_path: Path, small_cifar_val: int) -> None:
    train, _ = write_cifar(tmp_path)
    images = np.concatenate([open_ds("cifar10", tmp_path).load(s) for s in ("train", "val")])
    planes = [img for img in images if (img[..., 0] == 10).all()]
    assert len(planes) == 1
    assert (planes[0][..., 1] == 20).all() and (planes[0][..., 2] == 30).all()


def test_cifar10_tar_gz_equals_extracted_folder(tmp_path: Path, small_cifar_val: int) -> None:
    write_cifar(tmp_path / "folder")
    write_cifar(tmp_path / "tar", tar=True)
    a, b = open_ds("cifar10", tmp_path / "folder"), open_ds("cifar10", tmp_path / "tar")
    for split in a.splits:
        np.testing.assert_array_equal(a.load(split), b.load(split))


def test_cifar10_accepts_numpy2_pickles(tmp_path: Path, small_cifar_val: int) -> None:
    _, test = write_cifar(tmp_path, numpy_module="numpy._core.multiarray")
    np.testing.assert_array_equal(open_ds("cifar10", tmp_path).load("test"), test)


def test_cifar10_folder_forms_and_path_precedence(
    tmp_path: Path, small_cifar_val: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, test = write_cifar(tmp_path / "data")
    batches = tmp_path / "data" / "cifar-10-batches-py"
    # The batches folder itself.
    np.testing.assert_array_equal(open_ds("cifar10", batches).load("test"), test)
    # dataset.path wins over data.data_dir (which here does not even exist).
    ds = open_ds("cifar10", tmp_path / "nowhere", f"dataset.path={tmp_path / 'data'}")
    np.testing.assert_array_equal(ds.load("test"), test)
    # $HVAE_DATA_DIR when neither is set.
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    np.testing.assert_array_equal(open_ds("cifar10").load("test"), test)


def test_cifar10_without_any_folder_says_how_to_set_one() -> None:
    with pytest.raises(HvaeError) as err:
        open_ds("cifar10")
    text = err.value.one_line()
    assert "--data-dir" in text and DATA_DIR_ENV in text and "kriz/cifar" in text


def test_cifar10_missing_files_name_folder_files_and_source(tmp_path: Path) -> None:
    with pytest.raises(HvaeError) as err:
        open_ds("cifar10", tmp_path)
    text = err.value.one_line()
    for part in (str(tmp_path), "cifar-10-python.tar.gz", "data_batch_1", "test_batch"):
        assert part in text
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in text


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(HvaeError, match="missing data_batch_3"):
        open_ds("cifar10", tmp_path)


def test_cifar10_truncated_archive_is_a_clear_error(tmp_path: Path) -> None:
    write_cifar(tmp_path, tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(HvaeError) as err:
        open_ds("cifar10", tmp_path)
    assert str(archive) in err.value.message


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape", "not-a-dict"])
def test_cifar10_malformed_batch_names_the_file(tmp_path: Path, damage: str) -> None:
    write_cifar(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "wrong-shape":
        target.write_bytes(cifar_batch(np.zeros((4, 3071), np.uint8), "bad"))
    else:
        target.write_bytes(py2_pickle([1, 2, 3]))
    with pytest.raises(HvaeError) as err:
        open_ds("cifar10", tmp_path)
    assert str(target) in err.value.message


class Evil:
    """Unpickles by calling ``func(arg)``: the classic pickle exploit."""

    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return (self.func, (self.arg,))


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("tar", [False, True])
def test_cifar10_malicious_pickle_is_refused_and_nothing_runs(
    tmp_path: Path, attack: str, tar: bool
) -> None:
    write_cifar(tmp_path / "data", tar=tar)
    marker = tmp_path / "pwned"
    if attack == "os.system":
        evil = Evil(os.system, f"touch {marker}")
    else:
        evil = Evil(eval, f"open({str(marker)!r}, 'w').close()")
    payload = py2_pickle({b"data": evil, b"labels": []})
    # Sanity: the payload really runs code when unpickled the ordinary way.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    if tar:
        archive = tmp_path / "data" / "cifar-10-python.tar.gz"
        with tarfile.open(archive, "w:gz") as out:
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.size = len(payload)
            out.addfile(info, io.BytesIO(payload))
        where = archive
    else:
        where = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
        where.write_bytes(payload)
    with pytest.raises(HvaeError) as err:
        open_ds("cifar10", tmp_path / "data")
    text = err.value.one_line()
    assert "refused" in text and str(where) in text
    assert ("system" if attack == "os.system" else "eval") in text
    assert not marker.exists()


def python3_cifar_batch(rows: np.ndarray, label: str, protocol: int) -> bytes:
    """A batch as a Python 3 re-packaging writes it: the release's dict, pickle.dumps."""
    batch = {
        b"batch_label": label.encode(),
        b"labels": [int(i % 10) for i in range(len(rows))],
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))],
    }
    return pickle.dumps(batch, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_python3_pickles_of_every_protocol_load(
    tmp_path: Path, small_cifar_val: int, protocol: int
) -> None:
    train, test = write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(5):
        rows = chw_rows(train[i * 4 : (i + 1) * 4])
        payload = python3_cifar_batch(rows, f"training batch {i + 1} of 5", protocol)
        (folder / f"data_batch_{i + 1}").write_bytes(payload)
    payload = python3_cifar_batch(chw_rows(test), "testing batch 1 of 1", protocol)
    (folder / "test_batch").write_bytes(payload)
    ds = open_ds("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.load("test"), test)
    train_idx, val_idx = cifar10.split_indices(len(train))
    np.testing.assert_array_equal(ds.load("val"), train[val_idx])
    np.testing.assert_array_equal(ds.load("train"), train[train_idx])


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_safe_unpickler_reads_plain_data_and_arrays_as_pickle_does(protocol: int) -> None:
    from hvae_plugins.datasets.safe_pickle import loads_numpy_only

    value = {
        b"": b"",
        b"u8": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "big-endian": np.array([1.5, -2.0], dtype=">f4"),
        "strided": np.arange(10, dtype=np.int64)[::3],
        "text": np.array(["cat", "dog"]),
        "scalars": [np.int64(-3), np.float32(0.25), np.bool_(True), 7, 1.5, None],
        "empty": np.zeros((0, 3072), np.uint8),
    }
    payload = pickle.dumps(value, protocol=protocol)
    got, want = loads_numpy_only(payload), pickle.loads(payload)
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], np.ndarray):
            assert got[key].dtype == want[key].dtype and got[key].flags.writeable
            np.testing.assert_array_equal(got[key], want[key])
        else:
            assert got[key] == want[key]
            assert [type(v) for v in got[key]] == [type(v) for v in want[key]]


class Reduces:
    """Unpickles by calling ``func(*args)``, then optionally setting ``state`` (BUILD)."""

    def __init__(self, func: object, *args: object, state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize(
    "func, args",
    [
        (os.system, ("true",)),
        (eval, ("1",)),
        (getattr, ("", "join")),
        (subprocess.Popen, (["true"],)),
        (np.load, ("x.npy",)),
        (codecs.decode, (b"x", "rot13")),
    ],
    ids=["os.system", "eval", "getattr", "subprocess", "numpy.load", "codecs.decode"],
)
def test_safe_unpickler_refuses_globals_that_can_run_code(
    protocol: int, func: object, args: tuple
) -> None:
    from hvae_plugins.datasets.safe_pickle import RefusedGlobal, loads_numpy_only

    with pytest.raises(RefusedGlobal):
        loads_numpy_only(pickle.dumps({b"data": Reduces(func, *args)}, protocol=protocol))


def test_safe_unpickler_refuses_object_structured_and_misused_globals() -> None:
    from hvae_plugins.datasets.safe_pickle import loads_numpy_only

    with pytest.raises(pickle.UnpicklingError, match="object"):
        loads_numpy_only(py2_pickle(np.array([1, "x"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError, match="object"):
        loads_numpy_only(pickle.dumps(np.array([1, "x"], dtype=object), protocol=5))
    with pytest.raises(pickle.UnpicklingError, match="structured"):
        loads_numpy_only(pickle.dumps(np.zeros(2, dtype=[("a", "u1")]), protocol=4))
    import _codecs

    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        loads_numpy_only(pickle.dumps(Reduces(_codecs.encode, "x", "rot13"), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="argument"):  # bytes(10**12): memory
        loads_numpy_only(pickle.dumps(Reduces(bytes, 10**12), protocol=2))
    reconstruct = np.zeros(1).__reduce__()[0]
    with pytest.raises(pickle.UnpicklingError, match="type"):
        loads_numpy_only(pickle.dumps(Reduces(reconstruct, 5, (0,), b"b"), protocol=4))


def test_safe_unpickler_never_lets_a_pickled_dtype_state_mark_integers_as_objects() -> None:
    from hvae_plugins.datasets.safe_pickle import loads_numpy_only

    # numpy's own dtype.__setstate__ takes the flags from the pickle: 1 is "holds object
    # pointers", so an array of such a uint64 would hand numpy these raw bytes as pointers.
    flagged = Reduces(np.dtype, "u8", False, True, state=(3, "<", None, None, None, -1, -1, 1))
    reconstruct = np.zeros(1).__reduce__()[0]
    raw = struct.pack("<QQ", 0x4141414141, 0x4242424242)
    evil = Reduces(reconstruct, np.ndarray, (0,), b"b", state=(1, (2,), flagged, False, raw))
    loaded = loads_numpy_only(pickle.dumps(evil, protocol=4))
    assert loaded.dtype == np.uint64 and not loaded.dtype.hasobject
    np.testing.assert_array_equal(loaded, [0x4141414141, 0x4242424242])


def test_config_show_with_cifar10_via_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["config", "show", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "dataset: cifar10" in result.output
    assert f"data_dir: {tmp_path}" in result.output
    assert "dataset:\n  path: null" in result.output


@pytest.mark.slow
def test_cifar10_preset_starts_training_on_release_files_from_the_cli(tmp_path: Path) -> None:
    """`hvae train --dataset cifar10 --data-dir DIR --config cifar10`: VDVAE's full model on the
    release format. jax, and batch 32 as 8 micro-batches of 4, fit a 24 GB CPU (about 10 GB);
    the first step, then Ctrl-C, must leave a checkpoint one step in."""
    pytest.importorskip("jax")
    write_cifar(tmp_path / "data", per_batch=1007, n_test=8)  # 5,035: 5,000 val, 35 train
    command = [sys.executable, "-m", "hvae_core", "train", "--dataset", "cifar10"]
    command += ["--data-dir", str(tmp_path / "data"), "--config", "cifar10", "--backend", "jax"]
    command += ["--set", "training.batch_size_div=8", "--quiet", "--save-dir", str(tmp_path)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    deadline, seen = time.monotonic() + 3000, []
    try:
        while not any(x.startswith("epoch 1 step 1/1:") for x in seen):
            assert proc.poll() is None, "".join(seen)[-4000:]
            try:
                seen.append(lines.get(timeout=max(1.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail("no first step within 50 minutes:\n" + "".join(seen)[-4000:])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=600) == 130
    finally:
        proc.kill()
    reader.join(timeout=60)
    seen += [lines.get() for _ in range(lines.qsize())]
    out = "".join(seen)
    assert "39,145,700 parameters, 43 latent layers (412,432 dims); dataset cifar10" in out
    step = next(x for x in seen if x.startswith("epoch 1 step 1/1:"))
    bpd = float(step.split("bpd ")[1].split()[0])
    assert 5.0 < bpd < 12.0  # an untrained model on uniform noise images: a few bits per dim
    assert "interrupted; the run was checkpointed" in out
    [run_dir] = tmp_path.glob("cifar10-*")
    assert "enc_num_blocks: [12, 7, 7, 4, 0, 3]" in (run_dir / "config.yaml").read_text()
    from hvae_core.run import files as rundir

    _, meta = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    assert (meta["position"]["step"], meta["position"]["batch"]) == (1, 1)
    assert meta["image_shape"] == [32, 32, 3] and meta["num_bits"] == 8


def test_plugin_module_is_light_and_lists_every_dataset() -> None:
    code = (
        "import sys, hvae_plugins.datasets\n"
        "from hvae_core.plugins import load_registry\n"
        "print(sorted(load_registry({'datasets'}).names('dataset')))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sklearn', 'PIL', 'keras', 'tensorflow') or m.startswith('hvae_plugins.datasets.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, heavy = out.stdout.splitlines()
    assert names == str(["cifar10", "digits", "image-folder", "imagenet32", "imagenet64", "mnist"])
    assert heavy == "['hvae_plugins.datasets.options']"


# --------------------------------------------------------------------------------------------
# Downsampled ImageNet


def write_imagenet_npz(
    root: Path, size: int, counts: tuple[int, ...] = (2, 3, 2, 3, 2, 3, 2, 3, 2, 3), n_val: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """The npz release as its zips unpack (train and val in their own subfolders)."""
    train = random_images(sum(counts), size, seed=3)
    train[1] = rgb_planes_image(size)[0]
    val = random_images(n_val, size, seed=4)
    (root / f"Imagenet{size}_train_npz").mkdir(parents=True)
    (root / f"Imagenet{size}_val_npz").mkdir(parents=True)
    start = 0
    for i, k in enumerate(counts, start=1):
        save = np.savez_compressed if i % 2 else np.savez
        save(
            root / f"Imagenet{size}_train_npz" / f"train_data_batch_{i}.npz",
            data=chw_rows(train[start : start + k]),
            labels=np.arange(k) + 1,
            mean=np.zeros(3 * size * size),
        )
        start += k
    np.savez_compressed(
        root / f"Imagenet{size}_val_npz" / "val_data.npz", data=chw_rows(val), labels=np.ones(n_val)
    )
    return train, val


@pytest.fixture
def small_imagenet_val(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(imagenet, "VAL_SIZE", 5)
    return 5


def vdvae_split(train: np.ndarray, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """VDVAE's literal code (global RNG), restoring the global state afterwards."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        idx = np.random.permutation(train.shape[0])
    finally:
        np.random.set_state(state)
    return train[idx[:-n_val]], train[idx[-n_val:]]


def test_imagenet_split_constants_are_vdvaes() -> None:
    assert (imagenet.VAL_SIZE, imagenet.SPLIT_SEED) == (5000, 42)


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz_is_converted_once_and_memory_mapped(
    tmp_path: Path, small_imagenet_val: int, size: int
) -> None:
    train, val = write_imagenet_npz(tmp_path, size)
    ds = open_ds(f"imagenet{size}", tmp_path)
    assert ds.image_shape == (size, size, 3) and ds.splits == ("train", "val", "test")
    want_train, want_val = vdvae_split(train, 5)
    got_train, got_val, got_test = (ds.load(s) for s in ("train", "val", "test"))
    # Splits are lazy views over the memory-mapped cache; the test split is the map itself.
    assert isinstance(got_train, LazyImages) and isinstance(got_train.base, np.memmap)
    assert isinstance(got_val, LazyImages) and got_val.base is got_train.base
    assert isinstance(got_test, np.memmap)
    assert got_train.shape == want_train.shape and got_val.shape == (5, size, size, 3)
    np.testing.assert_array_equal(np.asarray(got_train), want_train)
    np.testing.assert_array_equal(np.asarray(got_val), want_val)
    np.testing.assert_array_equal(got_test, val)
    # The cache is the NHWC .npy beside the data, with its manifest.
    cache = np.load(tmp_path / f"hvae-imagenet{size}-train.npy")
    np.testing.assert_array_equal(cache, train)
    manifest = json.loads((tmp_path / f"hvae-imagenet{size}.json").read_text())
    assert manifest["shapes"]["train"] == [len(train), size, size, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_imagenet_chw_rows_become_hwc_images(tmp_path: Path, small_imagenet_val: int) -> None:
    write_imagenet_npz(tmp_path, 32)
    ds = open_ds("imagenet32", tmp_path)
    images = np.concatenate([np.asarray(ds.load(s)) for s in ("train", "val")])
    [planes] = [img for img in images if (img[..., 0] == 10).all()]
    assert (planes[..., 1] == 20).all() and (planes[..., 2] == 30).all()


def test_imagenet_cache_is_reused_rebuilt_when_stale_and_used_alone(
    tmp_path: Path, small_imagenet_val: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, _ = write_imagenet_npz(tmp_path, 32)
    open_ds("imagenet32", tmp_path)
    cache = tmp_path / "hvae-imagenet32-train.npy"
    first = cache.stat().st_mtime_ns

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(imagenet, "atomic_npy", no_conversion)
        open_ds("imagenet32", tmp_path)  # reused: no conversion
    # A changed source file (one image more) rebuilds the cache.
    extra = random_images(3, 32, seed=9)
    np.savez(tmp_path / "Imagenet32_train_npz" / "train_data_batch_10.npz", data=chw_rows(extra))
    ds = open_ds("imagenet32", tmp_path)
    assert len(ds.load("train")) + len(ds.load("val")) == len(train)  # 3 replaced by 3
    assert cache.stat().st_mtime_ns != first
    np.testing.assert_array_equal(np.load(cache)[-3:], extra)
    # With the npz files gone, the cache alone still works.
    for path in sorted(tmp_path.glob("Imagenet32_*/*.npz")):
        path.unlink()
    assert len(open_ds("imagenet32", tmp_path).load("test")) == 4


def test_imagenet_cache_dir_option(tmp_path: Path, small_imagenet_val: int) -> None:
    write_imagenet_npz(tmp_path / "data", 32)
    open_ds("imagenet32", tmp_path / "data", f"dataset.cache_dir={tmp_path / 'cache'}")
    assert (tmp_path / "cache" / "hvae-imagenet32-train.npy").is_file()
    assert not (tmp_path / "data" / "hvae-imagenet32-train.npy").exists()


def test_imagenet_vdvae_npy_files_are_memory_mapped(tmp_path: Path, small_imagenet_val) -> None:
    train, test = random_images(12, 32, seed=5), random_images(3, 32, seed=6)
    np.save(tmp_path / "imagenet32-train.npy", train)
    np.save(tmp_path / "imagenet32-valid.npy", test)
    ds = open_ds("imagenet32", tmp_path)
    assert isinstance(ds.load("train").base, np.memmap)
    assert isinstance(ds.load("test"), np.memmap)
    want_train, want_val = vdvae_split(train, 5)
    np.testing.assert_array_equal(np.asarray(ds.load("train")), want_train)
    np.testing.assert_array_equal(np.asarray(ds.load("val")), want_val)
    np.testing.assert_array_equal(ds.load("test"), test)
    # Reading a batch touches only the rows it needs: it is a gather, not a copy of the split.
    rows = np.array([3, 0, 5])
    np.testing.assert_array_equal(ds.load("train")[rows], want_train[rows])


def test_imagenet64_does_not_take_32px_files(tmp_path: Path) -> None:
    write_imagenet_npz(tmp_path, 32)
    with pytest.raises(HvaeError) as err:
        open_ds("imagenet64", tmp_path)
    text = err.value.one_line()
    assert "64x64" in text and "32x32" in text and "train_data_batch_1.npz" in text


def test_imagenet_both_resolutions_side_by_side(tmp_path: Path, small_imagenet_val) -> None:
    _, val32 = write_imagenet_npz(tmp_path, 32)
    _, val64 = write_imagenet_npz(tmp_path, 64)
    np.testing.assert_array_equal(open_ds("imagenet32", tmp_path).load("test"), val32)
    np.testing.assert_array_equal(open_ds("imagenet64", tmp_path).load("test"), val64)


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong-shape", "channels-first"])
def test_imagenet_bad_files_are_clear_errors(tmp_path: Path, damage: str) -> None:
    if damage in ("missing", "truncated"):
        write_imagenet_npz(tmp_path, 32)
        target = tmp_path / "Imagenet32_train_npz" / "train_data_batch_7.npz"
        if damage == "missing":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[:-40])
    else:
        target = tmp_path / "imagenet32-train.npy"
        bad = np.zeros((6, 3, 32, 32) if damage == "channels-first" else (6, 32, 32), np.uint8)
        np.save(target, bad)
        np.save(tmp_path / "imagenet32-valid.npy", random_images(2, 32, seed=0))
    with pytest.raises(HvaeError) as err:
        open_ds("imagenet32", tmp_path)
    text = err.value.one_line()
    assert target.name in text and "image-net.org" in text
    if damage == "channels-first":
        assert "NHWC" in text


def test_imagenet_truncated_npy_is_a_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "imagenet32-train.npy", random_images(8, 32, seed=0))
    np.save(tmp_path / "imagenet32-valid.npy", random_images(2, 32, seed=0))
    target = tmp_path / "imagenet32-train.npy"
    target.write_bytes(target.read_bytes()[:-1000])
    with pytest.raises(HvaeError, match="imagenet32-train.npy"):
        open_ds("imagenet32", tmp_path)


def test_imagenet_empty_folder_lists_both_forms(tmp_path: Path) -> None:
    with pytest.raises(HvaeError) as err:
        open_ds("imagenet64", tmp_path)
    text = err.value.one_line()
    assert "imagenet64-train.npy" in text and "val_data.npz" in text
    assert "Imagenet64_train_part1_npz.zip" in text


# --------------------------------------------------------------------------------------------
# MNIST


def idx_bytes(images: np.ndarray) -> bytes:
    header = struct.pack(">IIII", 0x00000803, len(images), 28, 28)
    return header + images.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 12, n_test: int = 4, gz: bool = False) -> tuple:
    train = random_images(n_train, 28, seed=7, channels=1)[..., 0]
    test = random_images(n_test, 28, seed=8, channels=1)[..., 0]
    root.mkdir(parents=True, exist_ok=True)
    for name, images in [("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)]:
        raw = idx_bytes(images)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return train, test


@pytest.fixture
def small_mnist_val(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(mnist, "VAL_SIZE", 3)
    return 3


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_padded_to_32_with_last_train_images_as_val(
    tmp_path: Path, small_mnist_val: int, gz: bool
) -> None:
    train, test = write_mnist(tmp_path, gz=gz)
    ds = open_ds("mnist", tmp_path)
    assert ds.image_shape == (32, 32, 1) and ds.num_bits == 8
    assert [len(ds.load(s)) for s in ds.splits] == [9, 3, 4]
    padded = ds.load("train")
    assert padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, 2:30, 2:30, 0], train[:9])
    assert padded[:, :2].sum() == 0 and padded[:, 30:].sum() == 0
    assert padded[:, :, :2].sum() == 0 and padded[:, :, 30:].sum() == 0
    np.testing.assert_array_equal(ds.load("val")[:, 2:30, 2:30, 0], train[9:])
    np.testing.assert_array_equal(ds.load("test")[:, 2:30, 2:30, 0], test)
    assert mnist.VAL_SIZE == 3  # the real default is 5000: see the next test


def test_mnist_default_val_size() -> None:
    assert mnist.VAL_SIZE == 5000


def test_mnist_resized_with_pillow(tmp_path: Path, small_mnist_val: int) -> None:
    train, _ = write_mnist(tmp_path)
    ds = open_ds("mnist", tmp_path, "dataset.image_size=16", "dataset.resize=true")
    assert ds.image_shape == (16, 16, 1)
    want = np.asarray(Image.fromarray(train[0]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.load("train")[0, ..., 0], want)


def test_mnist_smaller_than_28_needs_resize(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    with pytest.raises(ConfigError) as err:
        open_ds("mnist", tmp_path, "dataset.image_size=16")
    assert "resize: true" in err.value.one_line()


def test_mnist_binarize_is_one_bit_bernoulli_per_draw(tmp_path: Path, small_mnist_val) -> None:
    write_mnist(tmp_path)
    ds = open_ds("mnist", tmp_path, "dataset.binarize=true")
    assert ds.num_bits == 1
    levels = np.array([0, 1, 64, 128, 254, 255], np.uint8)
    batch = np.broadcast_to(levels, (20000, 6)).copy()
    draws = ds.transform_batch(batch, np.random.default_rng(0))
    assert draws.dtype == np.uint8 and set(np.unique(draws)) <= {0, 1}
    assert (draws[:, 0] == 0).all() and (draws[:, -1] == 1).all()
    np.testing.assert_allclose(draws.mean(axis=0), levels / 255, atol=0.012)
    again = ds.transform_batch(batch, np.random.default_rng(0))
    np.testing.assert_array_equal(draws, again)
    assert not np.array_equal(draws, ds.transform_batch(batch, np.random.default_rng(1)))


def test_mnist_binarize_refuses_more_bits(tmp_path: Path, small_mnist_val: int) -> None:
    write_mnist(tmp_path)
    with pytest.raises(ConfigError, match="num_bits"):
        open_ds("mnist", tmp_path, "dataset.binarize=true", "data.num_bits=8")


@pytest.mark.parametrize("damage", ["missing", "truncated", "magic", "size"])
def test_mnist_bad_files_are_clear_errors(tmp_path: Path, damage: str) -> None:
    write_mnist(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte"
    raw = target.read_bytes()
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(raw[:-10])
    elif damage == "magic":
        target.write_bytes(struct.pack(">I", 0x00000801) + raw[4:])  # a label file's magic
    else:
        target.write_bytes(raw[:8] + struct.pack(">II", 32, 32) + raw[16:])
    with pytest.raises(HvaeError) as err:
        open_ds("mnist", tmp_path)
    text = err.value.one_line()
    assert "t10k-images-idx3-ubyte" in text and "yann.lecun.com" in text


def test_mnist_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-20])
    with pytest.raises(HvaeError, match="train-images-idx3-ubyte.gz"):
        open_ds("mnist", tmp_path)


# --------------------------------------------------------------------------------------------
# image-folder


def write_folder(root: Path) -> list[str]:
    """A small tree of PNG and JPEG images in assorted modes and sizes, plus noise to skip."""
    rng = np.random.default_rng(11)
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / ".hidden").mkdir()
    names = []
    for i in range(7):
        name = f"a/img{i}.png" if i < 4 else f"b/img{i}.PNG"
        pixels = rng.integers(0, 256, (12 + i, 10 + 2 * i, 3), np.uint8)
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    Image.fromarray(rng.integers(0, 256, (9, 9), np.uint8)).save(root / "a/deep/grey.png")
    Image.fromarray(rng.integers(0, 256, (8, 16, 4), np.uint8)).save(root / "a/deep/rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 10, 3), np.uint8)).convert("P").save(
        root / "b/palette.png"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(root / "b/photo.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(root / "b/photo2.JPEG")
    names += ["a/deep/grey.png", "a/deep/rgba.png", "b/palette.png", "b/photo.jpg"]
    names += ["b/photo2.JPEG"]
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".hidden" / "skip.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "b" / ".skip.png")
    return sorted(names)


def test_image_folder_finds_decodes_and_splits(tmp_path: Path) -> None:
    names = write_folder(tmp_path)
    assert [rel for rel, _ in image_folder.list_images(tmp_path)] == names
    ds = open_ds(
        "image-folder",
        tmp_path,
        "dataset.image_size=8",
        "dataset.val_count=2",
        "dataset.test_count=3",
        "dataset.cache=false",
    )
    assert ds.image_shape == (8, 8, 3) and ds.num_bits == 8
    assert ds.splits == ("train", "val", "test")
    sizes = {s: len(ds.load(s)) for s in ds.splits}
    assert sizes == {"train": 7, "val": 2, "test": 3}
    every = np.stack([image_folder.decode(tmp_path / n, 8) for n in names])
    idx = np.random.RandomState(0).permutation(len(names))
    np.testing.assert_array_equal(np.asarray(ds.load("val")), every[idx[-2:]])
    np.testing.assert_array_equal(np.asarray(ds.load("test")), every[idx[-5:-2]])
    np.testing.assert_array_equal(np.asarray(ds.load("train")), every[idx[:-5]])


def test_image_folder_fractions_and_no_test_split(tmp_path: Path) -> None:
    write_folder(tmp_path)
    ds = open_ds("image-folder", tmp_path, "dataset.image_size=8", "dataset.val_fraction=0.25")
    assert ds.splits == ("train", "val")
    assert (len(ds.load("train")), len(ds.load("val"))) == (9, 3)  # round(12 * 0.25)


def test_image_folder_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    # 8 high, 16 wide, column c holds the value 10 * c: the crop keeps columns 4..11.
    columns = np.repeat((np.arange(16, dtype=np.uint8) * 10)[None, :, None], 8, axis=0)
    Image.fromarray(np.repeat(columns, 3, axis=2)).save(tmp_path / "wide.png")
    tall = np.zeros((32, 16, 3), np.uint8)
    tall[8:24] = 200  # 32 high, 16 wide: halved to 16 x 8, then rows 4..11 are kept
    Image.fromarray(tall).save(tmp_path / "tall.png")
    wide = image_folder.decode(tmp_path / "wide.png", 8)
    np.testing.assert_array_equal(wide, columns[:, 4:12].repeat(3, axis=2))
    # Pillow's own Lanczos halving is the oracle for the resampling; the crop keeps rows 4..11.
    halved = np.asarray(Image.fromarray(tall).resize((8, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(image_folder.decode(tmp_path / "tall.png", 8), halved[4:12])
    assert halved[4:12].min() > 150 and halved[:3].max() < 20  # the band is what is kept


def test_image_folder_cache_is_written_reused_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = write_folder(tmp_path / "imgs")
    args = ("dataset.image_size=8", "dataset.val_count=2")
    ds = open_ds("image-folder", tmp_path / "imgs", *args)
    cache = tmp_path / "imgs" / ".hvae-cache" / "image-folder-8.npy"
    manifest = json.loads(cache.with_suffix(".json").read_text())
    assert [rel for rel, _ in manifest["files"]] == names and manifest["image_size"] == 8
    assert isinstance(ds.load("train").base, np.memmap)
    np.testing.assert_array_equal(
        np.load(cache), np.stack([image_folder.decode(tmp_path / "imgs" / n, 8) for n in names])
    )
    with monkeypatch.context() as m:
        m.setattr(image_folder, "decode", lambda *a: pytest.fail("cache not reused"))
        again = open_ds("image-folder", tmp_path / "imgs", *args)
        np.testing.assert_array_equal(np.asarray(again.load("val")), np.asarray(ds.load("val")))
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "new.png")
    grown = open_ds("image-folder", tmp_path / "imgs", *args)
    assert len(grown.load("train")) + len(grown.load("val")) == len(names) + 1
    assert np.load(cache).shape == (len(names) + 1, 8, 8, 3)
    # An explicit cache_dir, and no cache at all.
    open_ds("image-folder", tmp_path / "imgs", *args, f"dataset.cache_dir={tmp_path / 'c'}")
    assert len(list((tmp_path / "c").glob("image-folder-imgs-*-8.npy"))) == 1


def test_image_folder_unreadable_image_is_named(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(HvaeError) as err:
        open_ds("image-folder", tmp_path, "dataset.image_size=8", "dataset.cache=false")
    assert str(tmp_path / "b" / "broken.png") in err.value.message
    assert not list(tmp_path.rglob("*.tmp"))


def test_image_folder_truncated_image_is_named_and_no_cache_left(tmp_path: Path) -> None:
    write_folder(tmp_path)
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(big).save(tmp_path / "a" / "cut.png")
    target = tmp_path / "a" / "cut.png"
    target.write_bytes(target.read_bytes()[:-200])
    with pytest.raises(HvaeError, match="cut.png"):
        open_ds("image-folder", tmp_path, "dataset.image_size=8")
    cache_dir = tmp_path / ".hvae-cache"
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_image_folder_skips_symlink_loops_and_reads_linked_folders_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "imgs", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for where, name in [(root / "a", "one.png"), (outside, "two.png"), (root, "three.png")]:
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(where / name)
    (root / "a" / "up").symlink_to("..")  # a loop: imgs/a/up/a/up/...
    (root / "self").symlink_to("self")  # a link to itself: ELOOP as soon as it is looked at
    (root / "linked").symlink_to(outside)  # an ordinary linked folder: read, once
    (root / "z-again").symlink_to(outside)  # the same folder again: already read
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    listed = [rel for rel, _ in image_folder.list_images(root)]
    assert listed == ["a/one.png", "linked/two.png", "three.png"]
    ds = open_ds("image-folder", root, "dataset.image_size=8", "dataset.val_count=1")
    assert len(ds.load("train")) + len(ds.load("val")) == 3


def test_image_folder_unlistable_subfolder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_folder(tmp_path)
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if Path(str(path)).name == "deep":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(image_folder.os, "scandir", scandir)
    with pytest.raises(HvaeError) as err:
        image_folder.list_images(tmp_path)
    line = err.value.one_line()
    assert "\n" not in line and str(tmp_path / "a" / "deep") in line and "hint:" in line


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour): grey, grey and
    alpha, RGB or RGBA for 2-D, or 2, 3 or 4 channels."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    rows = pixels.astype(">u2").reshape(height, -1)
    scanlines = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def sixteen_bit_levels(shape: tuple[int, ...]) -> np.ndarray:
    """Random 16-bit values, with the edges of the scaling (0, 255, 256, mid-grey, 65535) in."""
    values = np.random.default_rng(16).integers(0, 65536, shape, np.uint16)
    values.reshape(-1)[:6] = [0, 255, 256, 32768, 32767, 65535]
    return values


def test_image_folder_16_bit_grey_png_keeps_the_high_byte(tmp_path: Path) -> None:
    grey = sixteen_bit_levels((8, 8))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "grey.png").mode == "I;16"  # really 16 bits on disk
    want = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert want[0, 3, 0] == 128  # mid-grey stays mid-grey
    np.testing.assert_array_equal(image_folder.decode(tmp_path / "grey.png", 8), want)
    halved = Image.fromarray(want).resize((4, 4), Image.Resampling.LANCZOS)  # after the scaling
    np.testing.assert_array_equal(image_folder.decode(tmp_path / "grey.png", 4), halved)


def test_image_folder_16_bit_colour_pngs_keep_the_high_byte(tmp_path: Path) -> None:
    rgb, grey_alpha = sixteen_bit_levels((8, 8, 3)), sixteen_bit_levels((8, 8, 2))
    png16(tmp_path / "rgb.png", rgb)
    png16(tmp_path / "grey-alpha.png", grey_alpha)
    Image.fromarray(sixteen_bit_levels((8, 8))).save(tmp_path / "grey.png")
    ds = open_ds("image-folder", tmp_path, "dataset.image_size=8", "dataset.val_count=1")
    every = np.concatenate([np.asarray(ds.load(s)) for s in ds.splits])
    idx = np.random.RandomState(0).permutation(3)
    names = np.array(["grey-alpha.png", "grey.png", "rgb.png"])[idx]  # sorted, then permuted
    decoded = dict(zip(names, every, strict=True))
    np.testing.assert_array_equal(decoded["rgb.png"], rgb >> 8)
    alpha_dropped = np.repeat(grey_alpha[..., :1] >> 8, 3, axis=2)
    np.testing.assert_array_equal(decoded["grey-alpha.png"], alpha_dropped)
    grey = np.asarray(Image.open(tmp_path / "grey.png"))
    np.testing.assert_array_equal(decoded["grey.png"], np.repeat(grey[..., None] >> 8, 3, axis=2))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(HvaeError, match="PNG or JPEG"):
        open_ds("image-folder", tmp_path)
    write_folder(tmp_path)
    with pytest.raises(HvaeError, match="none for training"):
        open_ds("image-folder", tmp_path, "dataset.image_size=8", "dataset.val_count=12")
    with pytest.raises(ConfigError, match="power of two"):
        open_ds("image-folder", tmp_path, "dataset.image_size=48")
    with pytest.raises(ConfigError, match="val_fraction"):
        open_ds("image-folder", tmp_path, "dataset.val_fraction=1.5")


# --------------------------------------------------------------------------------------------
# Shared behaviour


def test_digits_still_loads_unchanged() -> None:
    from hvae_plugins.datasets.digits import digits_images

    ds = open_ds("digits")
    assert ds.image_shape == (8, 8, 1) and ds.splits == ("train", "val", "test")
    assert sum(len(ds.load(s)) for s in ds.splits) == len(digits_images())
    assert max(int(ds.load(s).max()) for s in ds.splits) < 2**ds.num_bits


def test_num_bits_reduction_is_exact_in_memory_and_lazy(
    tmp_path: Path, small_imagenet_val: int
) -> None:
    full = open_ds("digits")
    for bits in range(1, full.num_bits):
        reduced = open_ds("digits", None, f"data.num_bits={bits}")
        assert reduced.num_bits == bits
        want = full.load("train") >> (full.num_bits - bits)
        np.testing.assert_array_equal(reduced.load("train"), want)
    write_imagenet_npz(tmp_path, 32)
    full, five = open_ds("imagenet32", tmp_path), open_ds("imagenet32", tmp_path, "data.num_bits=5")
    for split in full.splits:
        lazy = five.load(split)
        assert isinstance(lazy, LazyImages) and isinstance(lazy.base, np.memmap)
        np.testing.assert_array_equal(np.asarray(lazy), np.asarray(full.load(split)) >> 3)
    assert np.asarray(full.load("test")).max() > 31  # the memmap itself is untouched


# --------------------------------------------------------------------------------------------
# A dataset that takes its image size from its files


@dataclass
class NpzOptions:
    image_size: int | None = option(None, "side of the images; null: the file's")


@pytest.fixture
def npz_dataset(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A dataset 'npz-test' reading ``images.npz`` from the data folder, registered for the
    test; yields the folder and a list that grows by one whenever the factory runs."""
    opened: list[int] = []

    def load_npz(options: NpzOptions, data: Any) -> InMemoryDataset:
        opened.append(1)
        with np.load(Path(data.data_dir) / "images.npz") as files:
            images = files["images"]
        return InMemoryDataset({"train": images[:-4], "val": images[-4:]}, num_bits=8)

    with temporary_plugin(get_registry(), "dataset", "npz-test", load_npz, options=NpzOptions):
        yield tmp_path, opened


def write_npz(folder: Path, size: int, width: int | None = None) -> None:
    images = random_images(20, size, seed=3)[:, :, : width or size]
    np.savez(folder / "images.npz", images=images)


def test_dataset_without_image_size_takes_it_from_its_files(npz_dataset, tmp_path: Path) -> None:
    from hvae_core.run import files as rundir

    folder, opened = npz_dataset
    write_npz(folder, 16)
    cfg = resolve_config("tiny", {"dataset": "npz-test", "data_dir": str(folder)})
    assert (cfg.image_size, cfg.num_scales, cfg.options("dataset").image_size) == (16, 5, 16)
    assert len(cfg.model.z_width) == 5  # per-scale options expanded to the data's scales
    assert open_dataset(cfg).image_shape == (16, 16, 3)
    assert len(opened) == 1  # resolving the config opened it; open_dataset did not again
    rundir.write_config(tmp_path, cfg)
    again = load_run_config(tmp_path / "config.yaml")
    assert again.image_size == 16 and len(opened) == 1  # the run's config records the size


@pytest.mark.slow
def test_dataset_without_image_size_trains_an_epoch(npz_dataset) -> None:
    folder, opened = npz_dataset
    write_npz(folder, 16)
    result = CliRunner().invoke(
        cli,
        ["train", "--config", "tiny", "--dataset", "npz-test", "--data-dir", str(folder)]
        + ["--epochs", "1", "--save-dir", str(folder / "runs"), "--quiet"]
        + ["--set", "run.jit=false", "--set", "training.batch_size=8"],
    )
    assert result.exit_code == 0, result.output
    [run] = (folder / "runs").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["train_bpd"])
    assert len(opened) == 1
    assert load_run_config(run / "config.yaml").options("dataset").image_size == 16


def test_configured_image_size_is_a_check_against_the_files(npz_dataset) -> None:
    folder, _ = npz_dataset
    write_npz(folder, 16)
    assert open_ds("npz-test", folder, "dataset.image_size=16").image_shape == (16, 16, 3)
    with pytest.raises(ConfigError) as err:
        open_ds("npz-test", folder, "dataset.image_size=8")
    line = err.value.one_line()
    assert "16x16 images but dataset.image_size is 8" in line and "(hint: " in line


@pytest.mark.parametrize(
    ("size", "width", "fragment"), [(12, None, "power of two"), (16, 8, "square")]
)
def test_a_size_from_the_files_that_cannot_be_modelled_is_one_line(
    npz_dataset, size: int, width: int | None, fragment: str
) -> None:
    folder, _ = npz_dataset
    write_npz(folder, size, width)
    with pytest.raises(ConfigError) as err:
        resolve_config(flags={"dataset": "npz-test", "data_dir": str(folder)})
    line = err.value.one_line()
    assert f"{size}x{width or size} images" in line and fragment in line and "(hint: " in line
