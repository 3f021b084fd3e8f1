"""Recipes: the shipped examples validate; bad keys, types and sections fail naming file and key; data
problems (path, column, target values, holes) fail as DataError naming file and column. No torch here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import ConfigError, DataError
from edgekit.exporters.training.tasks import load_task
from edgekit.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["skab", "fall_screening", "tug_seed", "ipol_gait"]

TABLE = """\
task = "toy"
seed = 0
labels = ["ok", "risk"]

[data]
loader = "table"
path = "toy.csv"
relative_to = "recipe"
features = ["a", "b"]
target = "y"
imputation = "{imputation}"

[features]
extractor = "table"
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def toy_csv(tmp_path: Path, rows: list[str], header: str = "a,b,y,sex") -> Path:
    path = tmp_path / "toy.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_validate(name: str) -> None:
    recipe = load_recipe(ROOT / "edgekit" / "recipes" / f"{name}.toml")
    assert isinstance(recipe, Recipe)
    assert recipe.task == name
    assert recipe.normal_label == recipe.labels[0]


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + "\n[predictor]\nepoch = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert str(exc.value).startswith(f"{path}: predictor.epoch: unknown key")
    assert "did you mean 'epochs'?" in str(exc.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + '\n[predictor]\nepochs = "ten"\n')
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert f"{path}: predictor.epochs:" in str(exc.value)
    assert "(got 'ten')" in str(exc.value)


def test_imputation_choice_is_checked(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="mean"))
    with pytest.raises(ConfigError, match=r"data\.imputation: .*'median'.*\(got 'mean'\)"):
        load_recipe(path)


RECORDINGS = """\
task = "s"
labels = ["normal", "anomaly"]
[data]
loader = "recordings"
path = "rec"
channels = ["a", "b"]
[data.layout]
rate_hz = 10.0
[data.label]
column = "y"
"""


def test_window_loader_needs_window_and_matching_extractor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"r\.toml: window: .*\[window\] is required for loader 'recordings'"):
        load_recipe(write(tmp_path, RECORDINGS + '[features]\nextractor = "machine"\n'))
    with pytest.raises(ConfigError, match=r"features: .*extractor 'table' does not fit loader 'recordings'"):
        load_recipe(write(tmp_path, RECORDINGS + '[window]\nsize = 8\nhop = 4\n[features]\nextractor = "table"\n'))


@pytest.mark.parametrize(("edit", "message"), [
    (("channels = [\"a\", \"b\"]\n", ""), "loader 'recordings' needs channels"),
    (('column = "y"', 'source = "intervals"'), "label.source 'intervals' needs label.intervals"),
    (('column = "y"', 'source = "sidecar"\nkeys = { anomaly = "Fault" }'), "needs data.sidecar"),
    (('column = "y"', 'column = "y"\nmap = { "1" = "fault" }'), r"labels \['fault'\] are not in labels"),
    (('[data.layout]', 'units = { c = "V" }\n[data.layout]'), r"units name \['c'\], which are not channels"),
    (('[data.layout]', 'name_pattern = "(?P<x"\n[data.layout]'), "name_pattern: .*not a regular expression"),
])
def test_recordings_section_is_checked(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = RECORDINGS.replace(*edit) + '[window]\nsize = 8\nhop = 4\n[features]\nextractor = "machine"\n'
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, text))


def test_cnn_on_a_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + '\n[predictor]\narch = "cnn1d"\nhidden = [8]\n')
    with pytest.raises(ConfigError, match=r"predictor: .*cnn1d' needs windows"):
        load_recipe(path)


def test_normal_label_must_be_a_label(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + '\n[autoencoder]\nnormal = "fine"\n')
    with pytest.raises(ConfigError, match=r"autoencoder: .*'fine' is not one of labels"):
        load_recipe(path)


def test_fractions_leave_room_to_train(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + "\n[splits]\ncal = 0.5\ntest = 0.4\n")
    with pytest.raises(ConfigError, match=r"splits\.test: .*at least 20% to train"):
        load_recipe(path)


def test_missing_file_is_a_data_error_naming_the_key(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="none")))
    with pytest.raises(DataError) as exc:
        load_task(recipe, tmp_path)
    assert "toy.csv (data.path): not found" in str(exc.value)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    toy_csv(tmp_path, ["1,2,0,F"], header="a,c,y,sex")
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="none")))
    with pytest.raises(DataError) as exc:
        load_task(recipe, tmp_path)
    assert "toy.csv (data.features)" in str(exc.value)
    assert "missing column(s) ['b']" in str(exc.value)


def test_target_outside_labels(tmp_path: Path) -> None:
    toy_csv(tmp_path, ["1,2,0,F", "1,3,2,M"])
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="none")))
    with pytest.raises(DataError, match=r"\(data\.target\).*class indices 0\.\.1.*got 2"):
        load_task(recipe, tmp_path)


def test_hole_without_imputation_and_all_empty_column(tmp_path: Path) -> None:
    toy_csv(tmp_path, ["1,2,0,F", "1,,1,M"])
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="none")))
    with pytest.raises(DataError, match=r"column 'b' is empty in a row.*imputation = 'median'"):
        load_task(recipe, tmp_path)
    toy_csv(tmp_path, ["1,,0,F", "1,,1,M"])
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="median")))
    with pytest.raises(DataError, match=r"\['b'\] are empty in every row"):
        load_task(recipe, tmp_path)


def test_empty_table_and_missing_class(tmp_path: Path) -> None:
    toy_csv(tmp_path, [])
    recipe = load_recipe(write(tmp_path, TABLE.format(imputation="none")))
    with pytest.raises(DataError, match="no rows"):
        load_task(recipe, tmp_path)
    toy_csv(tmp_path, ["1,2,0,F", "2,3,0,M"])
    with pytest.raises(DataError, match=r"no rows of class\(es\) \['risk'\]"):
        load_task(recipe, tmp_path)


def test_table_rows_keep_holes_as_nan_for_train_time_imputation(tmp_path: Path) -> None:
    toy_csv(tmp_path, ["1,2,0,F", "1,,1,M", "3,4,1,F"])
    text = TABLE.format(imputation="median").replace('target = "y"', 'target = "y"\ngroup_columns = ["sex"]')
    data = load_task(load_recipe(write(tmp_path, text)), tmp_path)
    assert data.features.shape == (3, 2)
    assert np.isnan(data.features[1, 1])
    assert data.y.tolist() == [0, 1, 1]
    assert data.report_groups["sex"].tolist() == ["F", "M", "F"]


def test_shipped_tug_table_loads_with_its_holes() -> None:
    recipe = load_recipe(ROOT / "edgekit" / "recipes" / "tug_seed.toml")
    data = load_task(recipe, ROOT / "edgekit" / "recipes")
    px = data.feature_names.index("px")
    assert data.features.shape == (23, 12)
    assert np.isnan(data.features[5:8, px]).all() and not np.isnan(np.delete(data.features[:, px], [5, 6, 7])).any()
    assert "BBS" not in data.feature_names and "y1" not in data.feature_names
    assert set(data.report_groups) == {"gender", "age_band"}


@pytest.mark.data
def test_skab_window_labels_follow_the_last_row(data_dir: Path, tmp_path: Path) -> None:
    text = (ROOT / "edgekit" / "recipes" / "skab.toml").read_text().replace(
        'glob = ["valve1/*.csv", "valve2/*.csv", "other/*.csv"]', 'glob = "valve2/*.csv"').replace(
        'max_gap_s = 300', 'max_gap_s = 300\nmax_files = 1')
    recipe = load_recipe(write(tmp_path, text))
    data = load_task(recipe, tmp_path)
    from edgekit.datasets import read_skab

    table = read_skab(data_dir / "skab" / "data" / "valve2" / "0.csv")
    rows = data.split_groups == "valve2/0.csv"
    n = int(rows.sum())
    assert recipe.window is not None
    size, hop = recipe.window.size, recipe.window.hop
    assert n == (len(table.values) - size) // hop + 1
    last = np.arange(n) * hop + size - 1
    assert data.y[rows].tolist() == table.labels["anomaly"][last].astype(int).tolist()
    assert data.features.shape[1] == 8  # each channel's mean (the recipe's spectral time = ["mean"])
    assert any(g.startswith("anomaly-free/anomaly-free.csv#") for g in set(data.split_groups))


SPECTRAL_FEATURES = """\
extractor = "spectral"

[params]
time = ["rms", "kurtosis", "crest"]
bands_hz = [[10, 100], [100, 1000], [1000, 5000]]
band_value = "rms"

[params.envelope]
carrier_hz = [2000, 4000]
bands_hz = [[84, 90], [171, 177]]
"""


def test_features_params_are_typed_from_toml(tmp_path: Path) -> None:
    """[features.params] (issue 12) is edgekit.manifest.FeatureParams: the contract's one model, checked when
    the recipe is read, with the recipe's error format."""
    from edgekit.config import load_config
    from edgekit.manifest import FeatureParams
    from edgekit.recipe import FeaturesSection

    section = load_config(write(tmp_path, SPECTRAL_FEATURES), FeaturesSection)
    assert isinstance(section.params, FeatureParams)
    assert section.params.bands_hz[2] == (1000.0, 5000.0) and section.params.band_value == "rms"
    assert section.params.envelope is not None and section.params.envelope.bands_hz[1] == (171.0, 177.0)
    assert load_config(write(tmp_path, 'extractor = "spectral"\n', "plain.toml"), FeaturesSection).params is None
    path = write(tmp_path, SPECTRAL_FEATURES.replace("band_value", "band_valu"), "typo.toml")
    with pytest.raises(ConfigError, match=r"typo.toml: params.band_valu: unknown key, did you mean 'band_value'"):
        load_config(path, FeaturesSection)
    path = write(tmp_path, SPECTRAL_FEATURES.replace("[84, 90]", "[84, 2500]"), "wide.toml")
    with pytest.raises(ConfigError, match=r"params: .*envelope.bands_hz\[0\] \[84, 2500\] Hz reaches above the "
                                          r"carrier band's width"):
        load_config(path, FeaturesSection)


def test_params_for_an_extractor_that_takes_none(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE.format(imputation="none") + "\n[features.params]\ntime = ['rms']\n")
    with pytest.raises(ConfigError, match=r"features: .*extractor 'table' takes no params \(only spectral does\)"):
        load_recipe(path)


def test_cnn1d_takes_any_channels_but_needs_a_window_its_poolings_survive(tmp_path: Path) -> None:
    from recordingfactory import RECIPE

    cnn = RECIPE.format(task="t", path="rec", epochs=1, size=200, hop=100).replace('arch = "mlp"\nhidden = [32]',
                                                               'arch = "cnn1d"\nhidden = [8]')
    assert load_recipe(write(tmp_path, cnn)).predictor.arch == "cnn1d"
    tiny = cnn.replace("size = 200\nhop = 100", "size = 3\nhop = 1")
    with pytest.raises(ConfigError, match=r"predictor: .*cnn1d needs windows of at least 4 samples \(window.size is 3\)"):
        load_recipe(write(tmp_path, tiny, "tiny.toml"))
