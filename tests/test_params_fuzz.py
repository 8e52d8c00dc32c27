"""Fuzzing the params loader: any document is either accepted (and then valid) or refused with ParamsError."""
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet_lab import params
from resnet_lab.params import ParamsError

STAGES = sorted(params.SCHEMAS)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)
keys = st.one_of(st.sampled_from(sorted({k for s in params.SCHEMAS.values() for k in s})), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STAGES), st.dictionaries(keys, values, max_size=6))
def test_any_mapping_is_accepted_whole_or_refused_clearly(stage, doc):
    try:
        p = params.validate(doc, stage)
    except ParamsError as e:
        assert str(e)  # a message, never a crash from deeper down
        return
    assert set(p) == set(params.SCHEMAS[stage]) and params.validate(p, stage) == p


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable, max_size=200))
def test_any_yaml_text_is_loaded_or_refused_clearly(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    try:
        params.load(f, "baseline")
    except ParamsError as e:
        assert str(f) in str(e) or "parameter" in str(e)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(params.SPACE_CHOICES + params.SPACE_RANGES), values, min_size=1, max_size=4))
def test_any_search_space_is_accepted_or_refused_clearly(space):
    try:
        p = params.validate({"search_space": space}, "optuna")
    except ParamsError as e:
        assert "search_space" in str(e)  # the message points into the search space
        return
    assert params.validate(p, "optuna")["search_space"] == p["search_space"]
