"""Repeated blocks as loops over stacked weights: the same maths as one block after another."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from backends import run_on_backend
from hvae_plugins.datasets.digits import digits_images

from hvae_core.backends.engine import make_engine
from hvae_core.backends.select import set_random_seed
from hvae_core.config import resolve_config
from hvae_core.model.blocks import ResidualBlock
from hvae_core.model.hvae import HVAE
from hvae_core.model.repeat import RepeatedLayers
from hvae_core.model.weights import runs_of
from hvae_core.plugins import get_registry
from hvae_core.training.optim import make_optimizer

# Several identical blocks per scale, VDVAE's pooling block, both heads' ingredients.
DEEP = [
    "model.enc_num_blocks=[3,2,0,2]",
    "model.dec_num_blocks=[3,2,1,2]",
    "model.pool_block=true",
    "training.batch_size=8",
    "training.scheduler=constant",
]


def engine(stack: bool, *overrides: str, seed: int = 0):
    cfg = resolve_config("tiny", overrides=[*DEEP, *overrides])
    set_random_seed(seed)
    model = HVAE(cfg, (8, 8, 1), 4, seed=seed, stack_blocks=stack)
    model.build_weights()
    return make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)


def values(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable.value)


def test_each_row_of_a_run_is_its_blocks_own_initial_weights() -> None:
    stacked = engine(True, "run.jit=false").model
    unstacked = engine(False, "run.jit=false").model
    assert stacked.count_params() == unstacked.count_params()
    by_name = {b.name: b for b in unstacked.decoder.blocks}
    by_name.update({b.name: b for stage in unstacked.encoder.stages for b in stage})
    runs = runs_of(stacked)
    # Two or more identical blocks make a run: encoder 8x8 (3, the last pools) and 1x1 (2);
    # decoder 1x1, 4x4 and 8x8. Single blocks keep their own weights.
    assert [len(r) for r in runs] == [2, 2, 2, 2, 3]
    for run in runs:
        for variable, position in run.stacked_variables():
            rows = values(variable)
            for k, member in enumerate(run.members):
                expected = values(by_name[member.name].variables[position])
                np.testing.assert_array_equal(rows[k], expected, err_msg=variable.path)
    # Far fewer variables for the optimizer: one per weight of a run, not per block.
    assert len(stacked.trainable_variables) < len(unstacked.trainable_variables)


def test_sampling_and_per_layer_temperatures_match_block_by_block() -> None:
    models = [engine(stack, "run.jit=false").model for stack in (True, False)]
    temps = [0.0, 0.5, 1.0, 0.2, 0.9, 0.3, 0.7, 0.0]
    rng = np.random.default_rng(0)
    noise = models[0].noise_shapes(4)
    eps = [rng.standard_normal(s).astype(np.float32) for s in noise.latents]
    pixels = rng.random(noise.pixels).astype(np.float32)
    a, b = (
        keras.ops.convert_to_numpy(m.generate(4, temps, noise=eps, pixel_noise=pixels))
        for m in models
    )
    np.testing.assert_array_equal(a, b)
    eps = [e[:2] for e in eps]
    za = models[0].latents(keras.ops.zeros((2, 8, 8, 1)), noise=eps)
    zb = models[1].latents(keras.ops.zeros((2, 8, 8, 1)), noise=eps)
    assert len(za) == len(zb) == 8
    for x, y in zip(za, zb, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y))


# Run directories of older hvae versions: slow (a whole training and resume), so `-m slow`.
@pytest.mark.slow
def test_a_checkpoint_of_one_weight_set_per_block_resumes_exactly() -> None:
    # Checkpoints written before blocks were stacked: weights, EMA and Adam moments all
    # continue where they were, and the stacked step is the block-by-block step (the same
    # step's noise comes from the same key).
    images = digits_images()[:8]
    old = engine(False, "run.jit=false")
    old.train_step(images, 1.0)
    new = engine(True, "run.jit=false", seed=7)  # other initial weights: all must come back
    new.load_state(old.state())
    a, b = old.train_step(images, 1.0, step=1), new.train_step(images, 1.0, step=1)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["kl_bpd"] == pytest.approx(b["kl_bpd"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # The EMA came across too: stacking rearranges its values, it changes none of them.
    ema_old, ema_new = (
        np.sort(np.concatenate([values(v).ravel() for v in e.ema])) for e in (old, new)
    )
    np.testing.assert_allclose(ema_new, ema_old, rtol=1e-6)


def test_a_checkpoint_of_another_model_still_fails_with_a_clear_reason() -> None:
    old = engine(False, "run.jit=false", "model.dec_num_blocks=[3,2,1,1]")
    new = engine(True, "run.jit=false")
    with pytest.raises(ValueError, match="model arrays"):
        new.load_state(old.state())


def test_a_run_refuses_layers_of_different_structure() -> None:
    run = RepeatedLayers([ResidualBlock(4, 2, 4), ResidualBlock(4, 3, 4)])
    with pytest.raises(ValueError, match="identical structure"):
        run.build(((None, 8, 8, 4),))


COMPILED_SCRIPT = """
import keras
from hvae_core.backends.select import set_random_seed
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer

for stack in (True, False):
    cfg = resolve_config("tiny", overrides=[
        "run.jit=true", "model.enc_num_blocks=[2,1,0,1]", "model.dec_num_blocks=[2,1,1,1]",
        "training.batch_size=8", "training.scheduler=constant", "training.batch_size_div=2",
        *inputs["overrides"].tolist(),
    ])
    set_random_seed(0)
    model = HVAE(cfg, (8, 8, 1), 4, seed=0, stack_blocks=stack)
    model.build_weights()
    engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)
    if keras.backend.backend() == "tensorflow":  # its loop, which a CPU step would unroll
        from hvae_core.backends.engine_tensorflow import _scan

        engine.block_loop = lambda: _scan
    for step in range(2):
        terms = engine.train_step(inputs["images"], 1.0)
        outputs[f"loss{int(stack)}_{step}"] = terms["loss"]
        outputs[f"norm{int(stack)}_{step}"] = terms["grad_norm"]
    outputs[f"eval{int(stack)}"] = engine.eval_step(inputs["images"])["elbo_bpd"]
"""


FLOW = pytest.param(["model.flow=orthogonal-sylvester"], marks=pytest.mark.slow, id="flow")


# TensorFlow's XLA compile of both models takes 90 s on a 2-core CPU: in the slow set.
TENSORFLOW = pytest.param("tensorflow", marks=pytest.mark.slow)


@pytest.mark.parametrize("overrides", [pytest.param([], id="plain"), FLOW])
@pytest.mark.parametrize("backend", ["jax", TENSORFLOW])
def test_compiled_loops_give_the_block_by_block_steps(backend, overrides, tmp_path) -> None:
    # jax.lax.scan and the tf.while_loop inside the compiled step (inside the micro-batch
    # loop), activations recomputed in the backward pass, the convolutions' NHWC/HWIO
    # gradients, and (slow) a posterior flow in every block: the same losses and norms.
    # (Torch and uncompiled steps run the Python loop the tests above check.)
    inputs = {"images": digits_images()[:8], "overrides": np.array(overrides, dtype=str)}
    out = run_on_backend(backend, COMPILED_SCRIPT, inputs, tmp_path)
    for key in ("loss", "norm"):
        for step in range(2):
            assert out[f"{key}1_{step}"] == pytest.approx(out[f"{key}0_{step}"], rel=1e-5)
    assert out["eval1"] == pytest.approx(out["eval0"], rel=1e-5)


TORCH_PARAMETERS_SCRIPT = """
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE

for i, overrides in enumerate([[], ["model.dec_num_blocks=[3,2,1,2]"],
                               ["model.attention=depthwise"]]):
    model = HVAE(resolve_config("tiny", overrides=overrides), (8, 8, 1), 4, seed=0)
    model.build_weights()
    registered = {id(p) for p in model.parameters()}
    outputs[f"missing{i}"] = sum(id(v.value) not in registered for v in model.trainable_variables)
    outputs[f"count{i}"] = len(model.trainable_variables)
"""


def test_every_weight_is_a_torch_parameter(tmp_path) -> None:
    # DDP and torch optimizers see a module's registered parameters: all of them must be, with
    # runs, single blocks, the head and attention built when the model is (a block built later
    # was missed, and DDP left its gradients unreduced).
    out = run_on_backend("torch", TORCH_PARAMETERS_SCRIPT, {}, tmp_path)
    for i in range(3):
        assert int(out[f"count{i}"]) > 20
        assert int(out[f"missing{i}"]) == 0


MIXED_SCRIPT = """
import jax
from hvae_core.backends.select import set_random_seed
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer

cfg = resolve_config("tiny", overrides=[*inputs["overrides"]])
set_random_seed(0)
model = HVAE(cfg, (8, 8, 1), 4, seed=0)
model.build_weights()
engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)
step = jax.make_jaxpr(engine._train_impl)(
    engine.state_arrays, inputs["images"], np.float32(1.0), np.float32(0.0),
    engine.step_noise_seed(0),
)
convs, loops = [], []

def walk(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            convs.append([str(v.aval.dtype) for v in eqn.invars])
        if eqn.primitive.name == "scan":
            loops.append(eqn.params["length"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    walk(inner)

walk(step.jaxpr)
outputs["convs"] = np.array(convs, dtype=str)
outputs["loops"] = np.array(loops)
state, terms = jax.eval_shape(
    engine._train_impl, engine.state_arrays, inputs["images"], np.float32(1.0), np.float32(0.0),
    engine.step_noise_seed(0),
)
outputs["state_dtypes"] = np.array(sorted({str(a.dtype) for a in jax.tree.leaves(state)}))
outputs["terms_dtypes"] = np.array(sorted({str(a.dtype) for a in jax.tree.leaves(terms)}))
"""


def test_mixed_bfloat16_runs_every_convolution_of_the_compiled_loops_in_bfloat16(
    tmp_path,
) -> None:
    # The JAX step as it is compiled (runs of blocks in lax.scan with recomputation, inside the
    # micro-batch scan): the convolutions of the forward and backward passes take bfloat16
    # operands; the weights, the optimizer state, the EMA and every reported term stay
    # float32 (the loss, KL and DMoL are computed in float32).
    overrides = [*DEEP, "model.precision=mixed_bfloat16", "training.batch_size_div=2"]
    inputs = {"images": digits_images()[:8], "overrides": np.array(overrides, dtype=str)}
    out = run_on_backend("jax", MIXED_SCRIPT, inputs, tmp_path)
    assert len(out["convs"]) > 50  # forward and both gradients of every convolution
    assert {tuple(c) for c in out["convs"]} == {("bfloat16", "bfloat16")}
    # The micro-batch loop (2) and the runs of blocks (2 and 3 long) are compiled loops.
    assert 2 in out["loops"] and 3 in out["loops"]
    # int32: the optimizer's step count; no noise seeds: the noise is drawn from a key.
    assert list(out["state_dtypes"]) == ["float32", "int32"]
    assert list(out["terms_dtypes"]) == ["float32"]
