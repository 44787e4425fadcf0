"""The route registry: every served name maps back to the route it names, and nothing else maps to a route."""

import pytest

from prism.routes import AUTO, BASE, PERSONA, adapter_key, persona_of, route_key, route_of, served_name, served_names


@pytest.mark.parametrize("route, persona, name, key", [
    (AUTO, None, "prism", None), (BASE, None, "prism-base", "base"), (PERSONA, None, "prism-persona", "persona"),
    (PERSONA, "poet", "prism-persona-poet", "persona-poet"),
    (PERSONA, "data-scientist", "prism-persona-data-scientist", "persona-data-scientist")])
def test_each_route_has_one_name_everywhere_and_the_name_gives_the_route_back(route, persona, name, key):
    assert served_name(route, persona) == name
    assert route_of(name) == (route, persona)
    if key is not None:
        assert route_key(route, persona) == key
    if route == PERSONA:
        assert adapter_key(persona) == key and persona_of(key) == persona


@pytest.mark.parametrize("name", ["gpt-4", "prism-", "prism-other", "prismbase", "persona", "prism-personas"])
def test_a_name_no_route_has_is_none(name):
    assert route_of(name) is None


def test_served_names_list_what_the_run_has():
    assert served_names(False) == ["prism", "prism-base"]
    assert served_names(True, ["poet"]) == ["prism", "prism-base", "prism-persona", "prism-persona-poet"]


def test_a_model_the_server_does_not_serve_is_a_404_that_says_why():
    from prism.serving.protocol import ApiError, check_model

    models = served_names(False)
    assert check_model("prism-base", models) == (BASE, None)
    for name, why in (("prism-persona", r"does not exist \(this run has no adapter\)"),
                      ("prism-persona-poet", r"\(no k-way adapter has that persona\)"),
                      ("gpt-4", r"'gpt-4' does not exist; available: prism, prism-base$")):
        with pytest.raises(ApiError, match=why) as refused:
            check_model(name, models)
        assert refused.value.status == 404
