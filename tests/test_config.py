"""LPLConfig: defaults, reading TOML like sd-scripts does, and every kind of mistake reported in one line."""

from __future__ import annotations

import dataclasses

import pytest

from lpl_plugin import ConfigError, LPLConfig, load_config, render_toml
from lpl_plugin.settings.toml_io import check_file

from .conftest import write


def problems_of(tmp_path, text):
    """The problem lines check_file reports for a TOML text."""
    _, problems = check_file(write(tmp_path, text))
    return [str(p) for p in problems]


def test_defaults_are_the_seed_recommendation():
    c = LPLConfig()
    assert (c.lpl_weight, c.lpl_t_threshold, c.lpl_loss_type, c.lpl_norm_type) == (1.0, 200, "mse", "shared")
    assert (c.lpl_pow_law, c.lpl_num_blocks, c.lpl_remove_outliers, c.lpl_scale, c.lpl_start) == (True, 4, True, True, 0)
    assert c.lpl_compat == "none" and c.lpl_dtype == "auto" and c.use_lpl is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lpl_weight = 2.0  # type: ignore[misc]


def test_every_field_has_help_text():
    for f in dataclasses.fields(LPLConfig):
        assert f.metadata["help"].endswith("."), f.name


def test_keys_at_top_level_and_in_any_table(tmp_path):
    text = 'pretrained_model_name_or_path = "x"\nuse_lpl = true\n[training]\nlpl_weight = 2\n[lpl]\nlpl_num_blocks = 2\n'
    c = load_config(write(tmp_path, text))
    assert c.use_lpl and c.lpl_weight == 2.0 and isinstance(c.lpl_weight, float) and c.lpl_num_blocks == 2


def test_alias_and_from_mapping():
    c = LPLConfig.from_mapping({"lpl_enabled": True, "lpl": {"lpl_loss_type": "l1"}, "learning_rate": 1e-4})
    assert c.use_lpl and c.lpl_loss_type == "l1"


def test_no_lpl_keys_means_off(tmp_path):
    assert load_config(write(tmp_path, 'learning_rate = 1e-4\n[general]\nshuffle_caption = true\n')) == LPLConfig()


@pytest.mark.parametrize("text, expected", [
    ("lpl_wieght = 1.0", "unknown option `lpl_wieght` (did you mean `lpl_weight`?)"),
    ('lpl_weight = "1.0 kg"', '`lpl_weight` must be a number, got "1.0 kg" (string)'),
    ("lpl_num_blocks = true", "`lpl_num_blocks` must be an integer, got true (boolean)"),
    ("lpl_weight = true", "`lpl_weight` must be a number, got true (boolean)"),
    ("lpl_t_threshold = 200.0", "`lpl_t_threshold` must be an integer, got 200.0 (float)"),
    ("lpl_num_blocks = 7", "`lpl_num_blocks` must be between 0 and 4, got 7"),
    ("lpl_start = -1", "`lpl_start` must be between 0 and 1000000000, got -1"),
    ("lpl_weight = nan", "`lpl_weight` must be a finite number, got nan"),
    ("lpl_snr_gamma = 0", "`lpl_snr_gamma` must be greater than 0, got 0"),
    ('lpl_loss_type = "L2"', '`lpl_loss_type` must be one of "mse", "l1", got "L2"'),
    ('use_lpl = "sure"', '`use_lpl` must be true or false, got "sure" (string)'),
    ("LPL_weight = 1.0", "`LPL_weight` is not an LPL option (did you mean `lpl_weight`?)"),
    ("[lpl]\nweight = 1.0", "[lpl] `weight` lacks the `lpl_` prefix"),
    ("use_lpl = true\nlpl_enabled = true", "`lpl_enabled` repeats `use_lpl`"),
    ("lpl_weight = 1.0\n[lpl]\nlpl_weight = 2.0", "[lpl] `lpl_weight` repeats `lpl_weight` already set at `lpl_weight`"),
    ("[a]\n[a.b]\nlpl_weight = 1.0", "[a.b] holds LPL keys two tables deep"),
])
def test_each_mistake_is_one_named_line(tmp_path, text, expected):
    lines = problems_of(tmp_path, text + "\n")
    assert len(lines) == 1, lines
    assert expected in lines[0] and lines[0].startswith(str(tmp_path / "cfg.toml"))
    assert "\n" not in lines[0]


def test_all_problems_are_collected(tmp_path):
    text = 'lpl_wieght = 1\n[lpl]\nlpl_num_blocks = 9\nlpl_norm_type = "batchnorm"\nlpl_scale = 1\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(info.value.problems) == 4
    assert {p.key for p in info.value.problems} == {"lpl_wieght", "lpl_num_blocks", "lpl_norm_type", "lpl_scale"}


def test_malformed_toml_names_line_and_column(tmp_path):
    lines = problems_of(tmp_path, 'use_lpl = true\nlpl_weight = = 2\n')
    assert len(lines) == 1 and ":2:" in lines[0] and "malformed TOML" in lines[0]
    lines = problems_of(tmp_path, 'use_lpl = true\nlpl_weight = 1\nlpl_weight = 2\n')
    assert ":3:" in lines[0]


def test_missing_file_and_non_utf8(tmp_path):
    assert "nope.toml: not found; check the path" in str(check_file(tmp_path / "nope.toml")[1][0])
    path = tmp_path / "latin.toml"
    path.write_bytes(b"# caf\xe9\nuse_lpl = true\n")
    assert "not UTF-8" in str(check_file(path)[1][0])


def test_render_round_trip(tmp_path):
    config = LPLConfig(use_lpl=True, lpl_weight=1.5, lpl_norm_type="batch", lpl_num_blocks=0, lpl_start=10)
    assert load_config(write(tmp_path, render_toml(config))) == config
    assert load_config(write(tmp_path, render_toml(config, table=None, comments=False), "flat.toml")) == config
    changed = render_toml(config, only_changed=True)
    assert "lpl_weight = 1.5" in changed and "lpl_loss_type" not in changed


def test_replace_validates():
    assert LPLConfig().replace(lpl_weight=2).lpl_weight == 2.0
    with pytest.raises(ConfigError, match="between 0 and 4"):
        LPLConfig().replace(lpl_num_blocks=5)


def test_valid_edge_cases(tmp_path):
    c = load_config(write(tmp_path, "use_lpl = true\nlpl_num_blocks = 0\nlpl_t_threshold = 1\nlpl_weight = 0\n"))
    assert (c.lpl_num_blocks, c.lpl_t_threshold, c.lpl_weight) == (0, 1, 0.0)


def edge_values(name: str) -> list:
    """Every valid edge of one option: both booleans, each choice, or its bounds and a value just inside them."""
    from lpl_plugin.settings.config import _FIELDS, choices, kind

    valid = choices(name)
    if kind(name) == "bool":
        return [True, False]
    if valid:
        return list(valid)
    meta = _FIELDS[name].metadata
    low, high = meta["minimum"], meta["maximum"]
    if kind(name) == "int":
        return [low, low + 1, high - 1, high]
    inside = low + 1e-9 if meta["exclusive_minimum"] else low
    return [inside, 5e-324 + inside, 0.1 + 0.2, high / 3, high]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(LPLConfig)])
def test_render_round_trip_over_every_option_and_edge(tmp_path, name):
    for value in edge_values(name):
        config = LPLConfig(**{name: value})
        for table, comments, only_changed in (("lpl", True, False), (None, False, False), ("training", False, True)):
            text = render_toml(config, table=table, comments=comments, only_changed=only_changed)
            assert load_config(write(tmp_path, text)) == config, (name, value, text)


def test_the_constructor_checks_every_field_at_once():
    with pytest.raises(ConfigError) as info:
        LPLConfig(lpl_loss_type="l2", lpl_weight=float("nan"), lpl_chunk_size=0)
    assert [p.key for p in info.value.problems] == ["lpl_weight", "lpl_loss_type", "lpl_chunk_size"]
    assert LPLConfig(lpl_weight=2).lpl_weight == 2.0 and isinstance(LPLConfig(lpl_weight=2).lpl_weight, float)
    numpy = pytest.importorskip("numpy")
    config = LPLConfig(lpl_num_blocks=numpy.int64(2), lpl_weight=numpy.float32(1.5))
    assert type(config.lpl_num_blocks) is int and type(config.lpl_weight) is float and config.lpl_num_blocks == 2
    with pytest.raises(ConfigError, match="unknown option `lpl_wieght`"):
        LPLConfig().replace(lpl_wieght=1.0)


def test_choices_come_from_the_literal_types():
    import argparse
    import typing

    from lpl_plugin import add_arguments, json_schema, options

    hints = typing.get_type_hints(LPLConfig)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for record in options():
        hint = hints[record["name"]]
        if typing.get_origin(hint) is typing.Literal:
            assert record["choices"] == list(typing.get_args(hint))
            assert json_schema()["properties"][record["name"]]["enum"] == record["choices"]
            assert list(by_flag[f"--{record['name']}"].choices) == record["choices"]
        else:
            assert record["choices"] is None


@pytest.mark.parametrize("table", ["lpl]\nlpl_weight = 100\n[x", "", "a b", "lpl_weight", "use_lpl", "lpl_enabled",
                                   "[lpl]", "lpl.x", 3])
def test_render_refuses_tables_that_are_not_safe_bare_keys(table):
    from lpl_plugin.settings.errors import ArgumentError

    with pytest.raises(ArgumentError, match="`table` must be a bare TOML key"):
        render_toml(LPLConfig(), table=table)


# -- values typed into GUIs: strings that read as the option's type under the command line's rules ----------------

GUI_STRINGS = {"use_lpl": ("true", True), "lpl_weight": ("1.0", 1.0), "lpl_t_threshold": ("1000", 1000),
               "lpl_snr_gamma": (" 2.5e0 ", 2.5), "lpl_pow_law": ("OFF", False), "lpl_num_blocks": ("2", 2)}


def test_gui_strings_are_their_values_everywhere_settings_are_read(tmp_path):
    import argparse

    from lpl_plugin.settings.preflight import check_training_mapping
    from lpl_plugin.settings.schema import validate

    expected = LPLConfig(**{name: value for name, (_, value) in GUI_STRINGS.items()})
    typed = {name: text for name, (text, _) in GUI_STRINGS.items()}
    toml_text = "".join(f'{name} = "{text}"\n' for name, text in typed.items())
    assert load_config(write(tmp_path, toml_text)) == expected
    assert LPLConfig.from_mapping({"lpl": typed}) == expected
    assert validate(typed) == {}
    namespace = argparse.Namespace(**typed, learning_rate="1e-4")  # what sd-scripts hands over from a flat TOML
    assert check_training_mapping(vars(namespace), "args").raise_for_problems() == expected
    assert LPLConfig(**typed) == expected and isinstance(LPLConfig(**typed).lpl_t_threshold, int)


@pytest.mark.parametrize("name, text, expected", [
    ("lpl_t_threshold", "1000.0", '`lpl_t_threshold` must be an integer, got "1000.0" (string)'),
    ("lpl_t_threshold", "1e3", '`lpl_t_threshold` must be an integer, got "1e3" (string)'),
    ("lpl_weight", "inf", '`lpl_weight` must be a finite number, got "inf"'),
    ("lpl_weight", "", '`lpl_weight` must be a number, got "" (string)'),
    ("lpl_weight", "500", '`lpl_weight` must be between 0 and 100, got "500"'),
    ("lpl_pow_law", "enabled", '`lpl_pow_law` must be true or false, got "enabled" (string)'),
])
def test_gui_strings_that_do_not_read_as_the_type_are_refused(name, text, expected):
    from lpl_plugin.settings.schema import validate

    assert validate({name: text}) == {name: [expected]}
