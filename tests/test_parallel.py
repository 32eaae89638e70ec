"""Data parallelism: the batch layout, clear errors, and one data-parallel step that equals the
single-device step on the same images, on each backend's own distributed engine."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from backends import require_backend, run_on_backend
from hvae_plugins.datasets.digits import digits_images

from hvae_core.backends.parallel import (
    Launch,
    check_batch,
    check_devices,
    launch_from_env,
    replica_slice,
)
from hvae_core.errors import ConfigError, HvaeError

# --- backend-neutral ----------------------------------------------------------------------


def test_replicas_take_equal_shares_of_every_micro_batch_and_noise_group() -> None:
    batch = np.arange(16)[:, None, None, None]  # 2 micro-batches x 2 groups x 2 replicas x 2
    parts = [replica_slice(batch, r, 2, div=2, groups=2)[:, 0, 0, 0].tolist() for r in range(2)]
    # Replica 0's micro-batch 0 is [its originals; their partners in group 1], and so on.
    assert parts == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    together = np.sort(np.concatenate(parts))
    assert together.tolist() == list(range(16))
    assert replica_slice(batch, 0, 1) is batch


def test_contiguous_shares_without_micro_batches() -> None:
    batch = np.arange(8)[:, None, None, None]
    assert replica_slice(batch, 1, 4)[:, 0, 0, 0].tolist() == [2, 3]


@pytest.mark.parametrize(
    ("batch", "div", "groups", "replicas", "unit"),
    [(10, 1, 1, 4, 4), (8, 2, 1, 3, 6), (12, 1, 2, 4, 8)],
)
def test_a_batch_that_does_not_divide_is_a_clear_error(batch, div, groups, replicas, unit) -> None:
    with pytest.raises(ConfigError, match=rf"does not split evenly .*\({unit}\)") as error:
        check_batch(batch, div, groups, replicas)
    assert f"multiple of {unit}" in error.value.hint
    check_batch(unit * 2, div, groups, replicas)


def test_device_counts() -> None:
    assert check_devices(0, 3, "GPUs are") == 3
    assert check_devices(2, 3, "GPUs are") == 2
    with pytest.raises(HvaeError, match="--devices 4 but only 3 GPUs are visible"):
        check_devices(4, 3, "GPUs are")


def test_launch_settings_from_the_environment() -> None:
    assert launch_from_env({}) == Launch()
    launch = launch_from_env(
        {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:1234",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": "1",
        }
    )
    assert launch == Launch("10.0.0.1:1234", 2, 1) and launch.multi_process
    with pytest.raises(ConfigError, match="no coordinator"):
        launch_from_env({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"})
    with pytest.raises(ConfigError, match="not in 0..1"):
        launch_from_env(
            {
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1",
                "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                "KERAS_DISTRIBUTION_PROCESS_ID": "2",
            }
        )


# --- one step, single device vs data parallel -------------------------------------------

STEP_SCRIPT = """
import keras
from hvae_core.config import resolve_config
from hvae_core.backends import engine as engine_module
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine, setup_parallel
from hvae_core.backends.parallel import Launch, Parallel

# No latent noise: replicas draw their own noise, so only a noiseless step can match exactly.
_cut = engine_module.latent_noise
engine_module.latent_noise = lambda model, flat, groups=1: [
    keras.ops.zeros_like(e) for e in _cut(model, flat, groups)
]
DEVICES = int(inputs["devices"])


def engine(parallel):
    cfg = resolve_config("tiny", overrides=[
        "training.batch_size=8", "training.batch_size_div=2", "training.scheduler=constant",
        "training.gradient_clipnorm=50",
    ])
    keras.utils.set_random_seed(0)  # every process starts from the same weights
    with parallel.scope():
        model = HVAE(cfg, (8, 8, 1), 4, seed=0)
        model.build_weights()
        from hvae_core.training.optim import make_optimizer
        return make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg, None, parallel)


single = engine(Parallel())
weights = single.model.get_weights()
terms = single.train_step(inputs["images"], 1.0)
single.sync()
outputs["single_norm"] = terms["grad_norm"]
for j, w in enumerate(single.model.get_weights()):
    outputs[f"single_{j}"] = w
for j, w in enumerate(single.ema):
    outputs[f"single_ema_{j}"] = keras.ops.convert_to_numpy(w.value)

parallel = setup_parallel(DEVICES, Launch(), 60)
outputs["replicas"] = parallel.replicas
dp = engine(parallel)
dp.model.set_weights(weights)
for e, w in zip(dp.ema, dp.trainable, strict=True):
    e.assign(keras.ops.convert_to_numpy(w.value))  # a copy: JAX donates the buffers
dp.after_external_change()
terms = dp.train_step(inputs["images"], 1.0)
dp.sync()
outputs["dp_norm"] = terms["grad_norm"]
for j, w in enumerate(dp.model.get_weights()):
    outputs[f"dp_{j}"] = w
for j, w in enumerate(dp.ema):
    outputs[f"dp_ema_{j}"] = keras.ops.convert_to_numpy(w.value)
"""


def assert_same_step(out: dict[str, np.ndarray], replicas: int) -> None:
    assert int(out["replicas"]) == replicas
    assert float(out["dp_norm"]) == pytest.approx(float(out["single_norm"]), rel=1e-4)
    names = [k[len("single_") :] for k in out if k.startswith("single_") and k != "single_norm"]
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(out[f"dp_{name}"], out[f"single_{name}"], rtol=1e-4, atol=1e-6)


def test_jax_data_parallel_step_equals_the_single_device_step(tmp_path, monkeypatch) -> None:
    require_backend("jax")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    inputs = {"images": digits_images()[:8], "devices": np.array(4)}
    out = run_on_backend("jax", STEP_SCRIPT, inputs, tmp_path)
    assert_same_step(out, 4)


TORCHRUN_SCRIPT = """
import os, sys
import numpy as np
inputs = dict(np.load(sys.argv[1]))
outputs = {}
exec(open(sys.argv[2]).read())
if int(os.environ["RANK"]) == 0:
    np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in outputs.items()})
"""


def test_torch_ddp_step_over_two_gloo_processes_equals_the_single_device_step(tmp_path) -> None:
    require_backend("torch")
    np.savez(tmp_path / "in.npz", images=digits_images()[:8], devices=np.array(0))
    (tmp_path / "step.py").write_text(STEP_SCRIPT)
    (tmp_path / "main.py").write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="torch")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(tmp_path / "main.py"),
            str(tmp_path / "in.npz"),
            str(tmp_path / "step.py"),
            str(tmp_path / "out.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_step(dict(np.load(tmp_path / "out.npz")), 2)


def test_replicas_keep_regularizer_pairs_together_with_or_without_shared_noise() -> None:
    from hvae_core.backends.parallel import batch_groups

    class Pairs:
        noise_groups = 1  # no shared noise, but still [originals; augmentations]
        batch_groups = 2

    assert batch_groups(None) == 1 and batch_groups(Pairs()) == 2
    batch = np.arange(8)[:, None, None, None]  # rows 0-3 originals, 4-7 their augmentations
    shares = [replica_slice(batch, r, 2, groups=batch_groups(Pairs()))[:, 0, 0, 0] for r in (0, 1)]
    assert [s.tolist() for s in shares] == [[0, 1, 4, 5], [2, 3, 6, 7]]


# --- several processes through the CLI --------------------------------------------------


def hvae(*args: str, backend: str, timeout: int = 900) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND=backend)
    return subprocess.Popen(
        [sys.executable, "-m", "hvae_core", "train", "--config", "tiny", "--quiet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 900) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out + err


def resume_on_one_device(run_dir, backend: str) -> list[dict]:
    from hvae_core.run import files as rundir

    finish(hvae("--resume", str(run_dir), "--epochs", "2", "--devices", "1", backend=backend))
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    return rows


def assert_one_complete_run_dir(save_dir) -> object:
    [run_dir] = list(save_dir.iterdir())
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.safetensors", "samples.png"):
        assert (run_dir / name).is_file(), name
    return run_dir


@pytest.mark.slow
def test_two_jax_processes_train_only_the_chief_writes_and_one_device_resumes(tmp_path) -> None:
    require_backend("jax")
    common = ["--epochs", "1", "--batch-size", "64", "--coordinator", "localhost:23611"]
    chief = hvae(
        *common,
        "--num-processes",
        "2",
        "--process-id",
        "0",
        "--save-dir",
        str(tmp_path / "chief"),
        backend="jax",
    )
    other = hvae(
        *common,
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--save-dir",
        str(tmp_path / "other"),
        backend="jax",
    )
    log = finish(chief)
    finish(other)
    assert "2 devices (data parallel in 2 processes)" in log
    assert not (tmp_path / "other").exists()  # the other process never writes
    run_dir = assert_one_complete_run_dir(tmp_path / "chief")
    resume_on_one_device(run_dir, "jax")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "how"),
    [("torch", "data parallel in 2 processes"), ("tensorflow", "data parallel")],
)
def test_devices_flag_trains_data_parallel_and_one_device_resumes(backend, how, tmp_path) -> None:
    """torch: two gloo processes started by hvae itself; tensorflow: two logical CPUs."""
    require_backend(backend)
    args = ("--epochs", "1", "--batch-size", "64", "--devices", "2", "--save-dir", str(tmp_path))
    log = finish(hvae(*args, backend=backend))
    assert f"2 devices ({how})" in log
    run_dir = assert_one_complete_run_dir(tmp_path)
    # A run trained on two devices is evaluated and sampled on one (torch's used to relaunch
    # under torchrun and fail).
    env = dict(os.environ, KERAS_BACKEND=backend)
    for command in (
        ["evaluate", str(run_dir), "--quiet"],
        ["sample", str(run_dir), "--n", "4", "--out", str(tmp_path / "s.png")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "hvae_core", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    resume_on_one_device(run_dir, backend)


def test_an_unreachable_coordinator_fails_in_one_line_within_the_timeout(tmp_path) -> None:
    require_backend("jax")
    process = hvae(
        "--coordinator",
        "127.0.0.1:9",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--save-dir",
        str(tmp_path),
        "--set",
        "run.connect_timeout=5",
        backend="jax",
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "error: could not join" in err and "hint:" in err
    assert "Traceback" not in err


def test_more_devices_than_visible_is_one_line(tmp_path) -> None:
    require_backend("jax")
    process = hvae("--devices", "64", "--save-dir", str(tmp_path), backend="jax")
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "error: --devices 64 but only 1 CPU devices are visible" in err
    assert "Traceback" not in err


# TensorFlow makes logical CPU devices only before its runtime starts, i.e. before the
# single-device engine of the step script: split the CPU first.
TF_STEP_SCRIPT = """
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
"""


# Two minutes on a 2-core CPU: slow. The JAX and torch equalities stay in the default set.
@pytest.mark.slow
def test_tensorflow_mirrored_step_over_two_logical_cpus_equals_the_single_device_step(
    tmp_path,
) -> None:
    require_backend("tensorflow")
    inputs = {"images": digits_images()[:8], "devices": np.array(2)}
    out = run_on_backend("tensorflow", TF_STEP_SCRIPT + STEP_SCRIPT, inputs, tmp_path)
    assert_same_step(out, 2)


NOISE_SCRIPT = """
import keras
import tensorflow as tf
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine, setup_parallel
from hvae_core.training.optim import make_optimizer
from hvae_core.backends.parallel import Launch

parallel = setup_parallel(2, Launch(), 60)
cfg = resolve_config("tiny", overrides=["training.batch_size=8"])
with parallel.scope():
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg, None, parallel)
train = engine._train
drawn = []


def recording(batch, beta, skipnorm, keys):
    # What each replica's step draws its latent noise from: the key it is handed.
    keys_per_replica = parallel.strategy.experimental_local_results(keys)
    drawn.append(np.stack([
        tf.random.stateless_normal((6,), seed=k).numpy() for k in keys_per_replica
    ]))
    return train(batch, beta, skipnorm, keys)


engine._train = recording
images = inputs["images"]
engine.train_step(images, 1.0, step=0)
saved = engine.state()
engine.train_step(images, 1.0, step=1)
engine.load_state(saved)
engine.train_step(images, 1.0, step=1)
outputs["first"], outputs["after_save"], outputs["after_restore"] = drawn
"""


def assert_replicas_draw_their_own_noise_and_a_restore_repeats_it(out) -> None:
    first, after_save, after_restore = out["first"], out["after_save"], out["after_restore"]
    assert first.shape[0] == 2  # replicas
    for draw in (first, after_save, after_restore):
        assert not np.isclose(draw[0], draw[1]).any()  # independent, not the same noise
    assert not np.isclose(first, after_save).any()  # every step draws anew
    np.testing.assert_array_equal(after_restore, after_save)  # resumed runs draw the same


def test_tensorflow_replicas_draw_their_own_noise_also_after_a_restore(tmp_path) -> None:
    inputs = {"images": digits_images()[:8]}
    out = run_on_backend("tensorflow", TF_STEP_SCRIPT + NOISE_SCRIPT, inputs, tmp_path)
    assert_replicas_draw_their_own_noise_and_a_restore_repeats_it(out)


TORCH_NOISE_SCRIPT = """
import keras
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer
from hvae_core.backends.parallel import Parallel

import torch.distributed as dist

# Each process is one replica; replica r's draws are the noise that process r would draw.
dist.all_reduce = lambda tensor: None  # one process plays each rank in turn: nothing to reduce
cfg = resolve_config("tiny", overrides=["training.batch_size=8"])
rows = {"first": [], "after_save": [], "after_restore": []}
for rank in (0, 1):
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)
    engine.parallel = Parallel(replicas=2, process_index=rank, num_processes=2)
    drawn = []
    draw = engine.draw
    engine.draw = lambda *a: drawn.append(draw(*a)) or drawn[-1]
    images = inputs["images"]
    engine.train_step(images, 1.0, step=0)
    saved = engine.state()
    engine.train_step(images, 1.0, step=1)
    engine.load_state(saved)
    engine.train_step(images, 1.0, step=1)
    for key, noise in zip(rows, drawn, strict=True):
        rows[key].append(keras.ops.convert_to_numpy(noise).ravel()[:64])
for key, value in rows.items():
    outputs[key] = np.stack(value)
"""


def test_torch_replicas_draw_their_own_noise_also_after_a_restore(tmp_path) -> None:
    inputs = {"images": digits_images()[:4]}
    out = run_on_backend("torch", TORCH_NOISE_SCRIPT, inputs, tmp_path)
    assert_replicas_draw_their_own_noise_and_a_restore_repeats_it(out)
