"""The persistent compilation cache: where it lives, that a second process loads what a first
one compiled, that a changed program misses it, and that a cache hvae cannot use (unwritable,
an unreadable entry) costs one warning line and never the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from backends import require_backend
from click.testing import CliRunner

from hvae_core.backends import compile_cache
from hvae_core.cli import cli


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder, this process not yet configured, the cache settings unset."""
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(compile_cache.ENABLE_ENV, raising=False)
    monkeypatch.setattr(compile_cache, "_configured", {})
    for name in (
        "TF_XLA_FLAGS",
        "JAX_COMPILATION_CACHE_DIR",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
        "TORCHINDUCTOR_CACHE_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def test_the_folder_is_hvae_cache_dir_else_the_user_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(compile_cache.CACHE_DIR_ENV)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.cache_root() == tmp_path / "xdg" / "hvae"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert compile_cache.cache_root() == Path.home() / ".cache" / "hvae"


def test_each_backend_caches_in_a_folder_named_by_its_versions(fresh) -> None:
    folder = compile_cache.backend_folder("jax")
    assert folder.parent == fresh / "jax"
    assert folder.name.startswith("jax") and "jaxlib" in folder.name
    if compile_cache._version("tensorflow") != "unknown":
        tf = compile_cache.backend_folder("tensorflow").name
        assert tf == f"tensorflow{compile_cache._version('tensorflow')}"


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_turns_it_off(fresh, monkeypatch, value) -> None:
    monkeypatch.setenv(compile_cache.ENABLE_ENV, value)
    state = compile_cache.state()
    assert not state.enabled and compile_cache.ENABLE_ENV in state.reason
    assert compile_cache.configure("tensorflow") is None
    assert "TF_XLA_FLAGS" not in os.environ
    assert not fresh.exists()


def test_run_compile_cache_false_turns_it_off(fresh) -> None:
    assert compile_cache.state(config_enabled=False) == compile_cache.State(
        False, "run.compile_cache is false"
    )
    assert compile_cache.configure("jax", enabled=False) is None
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert compile_cache.configure("jax") is None  # once per process: the backend reads it once


def test_on_by_default_each_backend_gets_its_own_setting(fresh, monkeypatch) -> None:
    assert compile_cache.state().enabled
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    tf = compile_cache.configure("tensorflow")
    assert tf == compile_cache.backend_folder("tensorflow") and tf.is_dir()
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 {compile_cache.TF_CACHE_FLAG}={tf}"
    torch = compile_cache.configure("torch")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(torch)


def test_a_users_own_tensorflow_cache_flag_wins(fresh, monkeypatch) -> None:
    mine = f"{compile_cache.TF_CACHE_FLAG}=/elsewhere"
    monkeypatch.setenv("TF_XLA_FLAGS", mine)
    compile_cache.configure("tensorflow")
    assert os.environ["TF_XLA_FLAGS"] == mine


def unwritable_folders(tmp_path: Path) -> list[Path]:
    """A folder under a file (nobody can create it), and a read-only folder (root still
    writes there, so only for other users)."""
    (tmp_path / "a-file").write_text("")
    folders = [tmp_path / "a-file" / "cache"]
    if os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        folders.append(read_only)
    return folders


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_an_unwritable_folder_is_one_warning_and_no_cache(fresh, monkeypatch, backend) -> None:
    for folder in unwritable_folders(fresh.parent):
        monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(folder))
        monkeypatch.setattr(compile_cache, "_configured", {})
        said: list[str] = []
        assert compile_cache.configure(backend, warn=said.append) is None
        assert len(said) == 1 and said[0].startswith("compile cache off: cannot write")
        assert "\n" not in said[0]
    assert "TF_XLA_FLAGS" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def tf_entry(fields: dict[int, bytes]) -> bytes:
    """A protobuf of length-delimited fields, as TensorFlow writes its cache entries."""
    out = b""
    for number, payload in fields.items():
        out += bytes([number << 3 | 2, len(payload)]) + payload
    return out


def test_entry_checks_tell_whole_from_unreadable_entries() -> None:
    whole = tf_entry({1: b"key", 2: b"hlo", 3: b"executable"})
    assert compile_cache._tf_entry_whole(whole)
    assert not compile_cache._tf_entry_whole(whole[:-3])  # truncated
    assert not compile_cache._tf_entry_whole(tf_entry({1: b"key", 2: b"hlo"}))  # no executable
    assert not compile_cache._tf_entry_whole(b"")
    assert not compile_cache._tf_entry_whole(os.urandom(64) + b"\xff" * 16)
    entry = zlib.compress(b"\0\0\0\1" + b"executable" * 10)
    assert compile_cache._jax_entry_whole(entry)
    assert not compile_cache._jax_entry_whole(entry[:-4])
    assert not compile_cache._jax_entry_whole(b"garbage")


def test_unreadable_entries_are_removed_with_one_warning(fresh) -> None:
    folder = compile_cache.backend_folder("tensorflow")
    folder.mkdir(parents=True)
    good = folder / "xla_compile_cache__1__2__XLA_CPU_JIT.pb"
    good.write_bytes(tf_entry({1: b"k", 2: b"h", 3: b"e"}))
    for n in (3, 4):
        (folder / f"xla_compile_cache__{n}__2__XLA_CPU_JIT.pb").write_bytes(os.urandom(100))
    said: list[str] = []
    assert compile_cache.configure("tensorflow", warn=said.append) == folder
    assert said == [
        f"compile cache: removed 2 unreadable entries from {folder}; compiling them again"
    ]
    assert compile_cache.entry_files("tensorflow", folder) == [good]
    checked = json.loads((folder / compile_cache.CHECKED).read_text())
    assert list(checked) == [good.name]  # checked once: the next process only lists it


def test_cache_info_and_clear(fresh, monkeypatch) -> None:
    for backend, name in (("jax", "jit_f-abc-cache"), ("tensorflow", "xla_compile_cache__1.pb")):
        folder = compile_cache.backend_folder(backend)
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x" * 2048)
    (fresh / "jax" / "jax0.0.1-jaxlib0.0.1").mkdir()  # an older jax's folder
    runner = CliRunner()
    result = runner.invoke(cli, ["cache", "info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"folder: {fresh}"
    assert lines[1].startswith("compile cache: on (the default;")
    jax_line = next(line for line in lines if line.startswith("jax: "))
    assert "2.0 KB, 1 entries" in jax_line and "jax0.0.1-jaxlib0.0.1" in jax_line
    info = json.loads(runner.invoke(cli, ["cache", "info", "--json"]).output)
    assert info["backends"]["tensorflow"]["entries"] == 1
    assert info["backends"]["torch"] == {
        "folder": str(fresh / "torch"),
        "bytes": 0,
        "entries": 0,
        "versions": [],
        "current": compile_cache.version_tag("torch"),
    }
    monkeypatch.setenv(compile_cache.ENABLE_ENV, "0")
    result = runner.invoke(cli, ["cache", "info"])
    assert f"compile cache: off (${compile_cache.ENABLE_ENV}=0)" in result.output

    result = runner.invoke(cli, ["cache", "clear", "--backend", "jax"])
    assert result.exit_code == 0 and result.output == f"removed {fresh / 'jax'}\n"
    assert not (fresh / "jax").exists() and (fresh / "tensorflow").exists()
    result = runner.invoke(cli, ["cache", "clear"])
    assert result.output == f"removed {fresh / 'tensorflow'}\n"
    result = runner.invoke(cli, ["cache", "clear"])
    assert result.output == f"the compile cache is empty ({fresh})\n"


# Programs compiled in a fresh process after hvae chose the backend, as every command does;
# each width (the arguments) is another program, as a changed model config makes one.
COMPILE = """
import os, sys
from hvae_core.backends.select import select_backend
select_backend(sys.argv[1])
if sys.argv[1] == "jax":
    import jax, jax.numpy as jnp
    from jax import monitoring
    events = []
    monitoring.register_event_listener(lambda name, **kw: events.append(name))
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    for width in sys.argv[2:]:
        events.clear()
        f(jnp.ones((4, int(width)))).block_until_ready()
        hits = events.count("/jax/compilation_cache/cache_hits")
        misses = events.count("/jax/compilation_cache/cache_misses")
        print(f"{width}: hits {hits} misses {misses}")
else:
    import tensorflow as tf
    f = tf.function(lambda x: tf.reduce_sum(tf.tanh(x @ tf.transpose(x))), jit_compile=True)
    for width in sys.argv[2:]:
        f(tf.ones((4, int(width))))
"""


def compile_once(
    backend: str, widths: list[int], cache: Path, **env: str
) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **env)
    environ[compile_cache.CACHE_DIR_ENV] = str(cache)
    environ.pop("TF_XLA_FLAGS", None)
    if backend == "tensorflow":  # TensorFlow says when it loads an entry (VLOG 1)
        environ.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="device_executable_persistor=1")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, backend, *map(str, widths)],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "compile cache" in line]


def counts(stdout: str) -> dict[str, tuple[int, int]]:
    """Width: (JAX's persistent cache hits, misses), as the JAX program prints them."""
    rows = [line.replace(":", "").split() for line in stdout.splitlines()]
    return {r[0]: (int(r[2]), int(r[4])) for r in rows if len(r) == 5 and r[1] == "hits"}


LOADED = "Loading cached entry for"  # TensorFlow's line on a hit


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_a_second_process_loads_the_compiled_program_and_a_changed_one_misses(
    backend, tmp_path
) -> None:
    require_backend(backend)
    cache = tmp_path / "cache"
    folder = cache / backend / compile_cache.version_tag(backend)

    first = compile_once(backend, [8], cache)
    entries = compile_cache.entry_files(backend, folder)
    assert entries, "the first compile wrote no cache entry"
    second = compile_once(backend, [8, 9], cache)  # 8 again, and a changed program
    grown = compile_cache.entry_files(backend, folder)
    assert set(entries) < set(grown)
    if backend == "jax":  # (hits, misses) of each width's compiles
        assert counts(first.stdout)["8"][0] == 0 < counts(first.stdout)["8"][1]
        assert counts(second.stdout)["8"][1] == 0 < counts(second.stdout)["8"][0]
        assert counts(second.stdout)["9"][1] > 0
    else:
        assert LOADED not in first.stderr
        assert second.stderr.count(LOADED) == 1  # 8 loaded; 9 compiled
    # Turned off, nothing is read or written.
    off = compile_once(backend, [8, 10], cache, **{compile_cache.ENABLE_ENV: "0"})
    assert compile_cache.entry_files(backend, folder) == grown
    if backend == "jax":
        assert counts(off.stdout) == {"8": (0, 0), "10": (0, 0)}
    else:
        assert LOADED not in off.stderr
    for done in (first, second, off):
        assert warnings_in(done.stderr) == []


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_a_corrupt_entry_is_one_warning_then_compiled_again(backend, tmp_path) -> None:
    require_backend(backend)
    cache = tmp_path / "cache"
    folder = cache / backend / compile_cache.version_tag(backend)
    compile_once(backend, [8], cache)
    entries = compile_cache.entry_files(backend, folder)
    for entry in entries:  # written over, as a disk error or a killed copy might
        entry.write_bytes(entry.read_bytes()[: len(entry.read_bytes()) // 2] + b"\x07garbage")
    (folder / compile_cache.CHECKED).unlink(missing_ok=True)
    done = compile_once(backend, [8], cache)
    said = warnings_in(done.stderr)
    assert len(said) == 1 and f"removed {len(entries)} unreadable entr" in said[0], done.stderr
    healed = compile_cache.entry_files(backend, folder)
    assert sorted(p.name for p in healed) == sorted(p.name for p in entries)  # written again
    assert all(compile_cache._readable(backend, p) for p in healed)
    assert warnings_in(compile_once(backend, [8], cache).stderr) == []


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_an_unwritable_cache_folder_does_not_fail_a_run(backend, tmp_path) -> None:
    require_backend(backend)
    for folder in unwritable_folders(tmp_path):
        done = compile_once(backend, [8], folder)
        said = warnings_in(done.stderr)
        assert len(said) == 1 and "compile cache off: cannot write" in said[0], done.stderr


def hvae(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **env)
    environ[compile_cache.CACHE_DIR_ENV] = str(cache)
    environ.pop("TF_XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "hvae_core", *args],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow  # four tiny training runs: about 3 minutes on 2 idle cores
def test_hvae_train_twice_compiles_once_and_a_changed_model_compiles_anew(tmp_path) -> None:
    require_backend("jax")
    cache = tmp_path / "cache"
    folder = compile_cache.backend_folder("jax").name
    train = ("train", "--config", "tiny", "--backend", "jax", "--epochs", "1", "--quiet")
    fast = ("--batch-size", "64", "--no-save")

    def entries() -> set[str]:
        return {p.name for p in compile_cache.entry_files("jax", cache / "jax" / folder)}

    hvae(*train, *fast, cache=cache)
    first = entries()
    assert any(name.startswith("jit_") for name in first)
    hvae(*train, *fast, cache=cache)
    assert entries() == first  # every program loaded
    hvae(*train, *fast, "--set", "model.z_width=[3]", cache=cache)
    assert entries() > first
    before = entries()
    off = ("--set", "run.compile_cache=false", "--set", "model.z_width=[4]")
    done = hvae(*train, *fast, *off, cache=cache)
    assert entries() == before and "compile cache" not in done.stderr
