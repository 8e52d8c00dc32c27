import tomllib

import yaml

from conftest import ROOT


def test_environment_yml_pins_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == pins
    extras = {p for group in project["optional-dependencies"].values() for p in group}
    assert all("==" in p for p in pins | extras)  # the database drivers of the extras too
