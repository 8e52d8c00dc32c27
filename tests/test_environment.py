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


def test_requires_python_is_true_of_every_pinned_dependency():
    # Before: ">=3.10", while the pinned numpy, pandas, scipy, matplotlib and onnxruntime need 3.11 and the tests
    # import tomllib (issue 17, item 7).
    import importlib.metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = SpecifierSet(project["requires-python"])
    floor = Version(str(ours).split(">=")[1].split(",")[0])
    for pin in project["dependencies"]:
        name = pin.split("==")[0]
        theirs = importlib.metadata.metadata(name).get("Requires-Python")
        if theirs:
            assert floor in SpecifierSet(theirs), f"{name} {theirs} does not run on Python {floor}, which {ours} allows"
