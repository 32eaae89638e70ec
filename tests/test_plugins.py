"""The plugin manager: entry points, the core built-ins, conflicts, broken packages."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
from conftest import FIRST_PARTY_ENTRY_POINTS

import hvae_core
from hvae_core.config import resolve_config
from hvae_core.errors import PluginError
from hvae_core.plugins import ALLOW_ENV, get_registry, load_registry, reset_registry
from hvae_core.testing import temporary_plugin

FLOW_MODULE = """
    from dataclasses import dataclass
    import hvae_core as hvae

    @dataclass
    class Options:
        depth: int = hvae.option(2, "layers")

    @hvae.hookimpl
    def register_flows(register):
        register("{name}", "{module}_impl:Flow", options=Options, summary="a test flow")
"""


def flow_package(module: str, name: str) -> dict[str, str]:
    return {
        module: FLOW_MODULE.format(name=name, module=module),
        f"{module}_impl": "class Flow:\n    pass\n",
    }


def test_core_builtins_register_through_the_hooks() -> None:
    registry = get_registry()
    assert registry.names("block") == ["depthwise", "vdvae"]
    assert registry.names("lr-schedule") == ["constant", "cosd", "linear-warmup"]
    assert registry.names("beta-schedule") == ["constant", "cyclic", "linear-warmup"]
    for spec in registry.all():
        assert spec.package == "hvae"
        assert spec.version == hvae_core.__version__


def test_first_party_dataset_comes_from_its_entry_point() -> None:
    assert get_registry().has("dataset", "digits")
    # With the entry point excluded, only the core's own built-ins remain.
    assert not load_registry(allow=set()).has("dataset", "digits")


def test_third_party_entry_point_is_loaded_with_its_distribution(install_distribution) -> None:
    install_distribution(
        "my-flows", "1.2.3", {"myflows": "my_flows"}, flow_package("my_flows", "planar")
    )
    spec = get_registry().get("flow", "planar")
    assert (spec.package, spec.version, spec.summary) == ("my-flows", "1.2.3", "a test flow")
    assert "my_flows_impl" not in sys.modules  # named by reference: imported only when used
    assert spec.load().__name__ == "Flow"
    assert "my_flows_impl" in sys.modules


def test_a_name_two_packages_register_is_listed_and_an_error_only_when_used(
    install_distribution,
) -> None:
    install_distribution(
        "first-pkg", "1.0", {"first": "first_mod"}, flow_package("first_mod", "same")
    )
    install_distribution(
        "second-pkg", "2.0", {"second": "second_mod"}, flow_package("second_mod", "same")
    )
    registry = get_registry()  # loading does not fail
    clash = [(s.package, s.version) for s in registry.clash("flow", "same")]
    assert clash == [("first-pkg", "1.0"), ("second-pkg", "2.0")]
    assert not any(s.name == "same" for s in registry.all("flow"))
    expected = "flow 'same' is registered by 2 packages: first-pkg 1.0 and second-pkg 2.0"
    assert expected in registry.problems()
    with pytest.raises(PluginError, match=expected):
        registry.get("flow", "same")
    with pytest.raises(PluginError, match=expected) as err:
        resolve_config(flags={"flow": "same"})  # choosing it in a config
    assert "HVAE_LOAD_PLUGINS" in err.value.hint
    assert resolve_config(flags={"flow": "none"}).model.flow is None  # the rest still works


def test_an_unknown_name_in_the_allow_list_is_a_warning_naming_the_installed_packages(
    install_distribution, monkeypatch
) -> None:
    install_distribution(
        "my-flows", "1.0", {"myflows": "my_flows"}, flow_package("my_flows", "planar")
    )
    monkeypatch.setenv(ALLOW_ENV, f"{FIRST_PARTY_ENTRY_POINTS},my-flowz")
    reset_registry()
    registry = get_registry()
    [warning] = registry.warnings
    assert warning.startswith("HVAE_LOAD_PLUGINS names 'my-flowz', which is neither")
    assert "my-flows (myflows)" in warning and "hvae (" in warning
    assert registry.has("dataset", "digits") and not registry.has("flow", "planar")
    with pytest.raises(PluginError) as err:
        registry.get("flow", "planar")
    assert "my-flowz" in err.value.hint


def test_same_name_in_different_kinds_is_fine(install_distribution) -> None:
    # "constant" is a core lr-schedule and beta-schedule at once; a flow may share it too.
    install_distribution(
        "const-flow", "1.0", {"c": "const_flow"}, flow_package("const_flow", "constant")
    )
    registry = get_registry()
    assert registry.has("flow", "constant") and registry.has("lr-schedule", "constant")


def test_broken_plugin_is_reported_and_the_rest_works(install_distribution) -> None:
    install_distribution(
        "broken-pkg",
        "0.1",
        {"broken": "broken_mod"},
        {"broken_mod": "raise RuntimeError('kaput at import')\n"},
    )
    install_distribution("good-pkg", "0.1", {"good": "good_mod"}, flow_package("good_mod", "ok"))
    registry = get_registry()
    assert registry.has("flow", "ok") and registry.has("block", "vdvae")
    [failure] = registry.failures
    assert failure.package == "broken-pkg"
    assert "RuntimeError: kaput at import" in failure.error
    # Asking for something that is missing mentions the broken package.
    with pytest.raises(PluginError) as err:
        registry.get("flow", "from-broken")
    assert "broken-pkg" in err.value.one_line()


def test_bad_registrations_are_reported_not_fatal(install_distribution) -> None:
    source = """
        import hvae_core as hvae

        @hvae.hookimpl
        def register_flows(register):
            register("Not_Kebab", "x:y")
    """
    install_distribution("bad-name", "0.1", {"bad": "bad_name_mod"}, {"bad_name_mod": source})
    registry = get_registry()
    [failure] = registry.failures
    assert failure.package == "bad-name" and "kebab-case" in failure.error
    assert registry.has("block", "vdvae")


def test_options_without_defaults_are_rejected(install_distribution) -> None:
    source = """
        from dataclasses import dataclass
        import hvae_core as hvae

        @dataclass
        class Options:
            size: int

        @hvae.hookimpl
        def register_datasets(register):
            register("nodefault", "x:y", options=Options, image_size=8)
    """
    install_distribution("no-default", "0.1", {"nd": "nd_mod"}, {"nd_mod": source})
    [failure] = get_registry().failures
    assert "has no default" in failure.error


def test_unknown_hook_is_reported(install_distribution) -> None:
    source = """
        import hvae_core as hvae

        @hvae.hookimpl
        def register_widgets(register):
            pass
    """
    install_distribution("typo-pkg", "0.1", {"typo": "typo_mod"}, {"typo_mod": source})
    [failure] = get_registry().failures
    assert failure.package == "typo-pkg" and "register_widgets" in failure.error


def test_allow_list_restricts_entry_points(install_distribution, monkeypatch) -> None:
    install_distribution(
        "my-flows", "1.0", {"myflows": "my_flows"}, flow_package("my_flows", "planar")
    )
    assert load_registry(allow={"my-flows"}).has("flow", "planar")  # by distribution name
    assert load_registry(allow={"myflows"}).has("flow", "planar")  # by entry-point name
    assert not load_registry(allow={"datasets"}).has("flow", "planar")


def test_temporary_registration_is_removed_afterwards() -> None:
    @dataclass
    class Options:
        width: int = hvae_core.option(3, "a width")

    registry = get_registry()
    with temporary_plugin(
        registry, "attention", "throwaway", lambda *a, **k: None, options=Options
    ):
        assert registry.get("attention", "throwaway").options is Options
    assert not registry.has("attention", "throwaway")


def test_unknown_name_lists_what_is_installed() -> None:
    with pytest.raises(PluginError) as err:
        get_registry().get("lr-schedule", "cosine")
    assert "unknown lr-schedule 'cosine'" in str(err.value)
    assert "constant, cosd, linear-warmup" in err.value.hint


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(PluginError, match="unknown plugin kind 'flows'"):
        get_registry().all("flows")


def test_target_that_fails_to_import_is_a_clear_error() -> None:
    registry = get_registry()
    expected = "ghost-pkg failed to load no_such_module_xyz:Flow"
    with (
        temporary_plugin(registry, "flow", "ghost", "no_such_module_xyz:Flow", package="ghost-pkg"),
        pytest.raises(PluginError, match=expected),
    ):
        registry.get("flow", "ghost").load()
